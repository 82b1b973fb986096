"""rotq.export: checkpoint writers (the rotq format and compressed-tensors); see the export issue."""
