"""lm-eval tasks on local data, for `rotq eval --tasks`.

lm-eval ships no benchmark data and its standard tasks download from a hub, which fails
offline. rotq therefore writes its own tasks at run time (a JSON-lines file, a task yaml with
``dataset_path: json`` and resolved paths, and the ``process_results`` hook) into a temporary
directory and hands it to lm-eval as an include path; ``--tasks-dir DIR`` adds the user's own
local task yamls the same way. Built-in tasks are document-level rolling log-likelihood (lm-eval's
``wikitext`` convention: word perplexity with words split on whitespace, byte perplexity,
bits per byte):

* ``wikisum``: the Wikipedia summaries' test split, one document per article (offline).
* ``wikitext2``: WikiText-2 test from a local ``wiki.test.raw`` (``--wikitext2 PATH``), one
  document per article (split at its ``= Title =`` headings).

The model is either the PyTorch reference (lm-eval's ``hf`` backend around the already loaded
model, online rotations and activation/KV quantizers included) or vLLM with the rotq plugin
(``rotq.serving.lm_eval_vllm``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from pathlib import Path

from rotq.quant.errors import RotqError

logger = logging.getLogger(__name__)

BUILTIN_TASKS = ("wikisum", "wikitext2")
_UTILS = '''import re


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
'''
_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
process_results: !function rotq_task_utils.process_results
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def wikitext2_documents(path: Path) -> list[str]:
    """WikiText-2's raw test file cut into articles at its top-level ``= Title =`` lines."""
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = $", text, flags=re.MULTILINE)]
    docs = [text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)])]
    return [d for d in docs if d]


def _documents(task: str, wikitext2: Path | None) -> list[str]:
    if task == "wikisum":
        from rotq.quant.data import wikisum_articles
        return list(wikisum_articles("test"))
    if wikitext2 is None or not Path(wikitext2).is_file():
        raise RotqError("task 'wikitext2' reads WikiText-2's wiki.test.raw: pass its path with --wikitext2 PATH")
    return wikitext2_documents(wikitext2)


def write_builtin_tasks(directory: Path, tasks: list[str], wikitext2: Path | None = None) -> None:
    """The data, yaml and hook of each built-in task in ``tasks`` into ``directory``."""
    directory = Path(directory)
    (directory / "rotq_task_utils.py").write_text(_UTILS)
    for task in tasks:
        data = directory / f"{task}.jsonl"
        with data.open("w", encoding="utf-8") as f:
            for doc in _documents(task, wikitext2):
                f.write(json.dumps({"page": doc}) + "\n")
        (directory / f"{task}.yaml").write_text(_YAML.format(task=task, data=data))


@contextlib.contextmanager
def local_tasks(tasks: list[str], tasks_dir: Path | None = None, wikitext2: Path | None = None,
                limit: int | None = None):
    """Check the task names and options (before any model is loaded), write the built-in tasks
    into a temporary include folder and yield lm-eval's TaskManager over it and ``tasks_dir``."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise RotqError("--tasks needs at least one task name")
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise RotqError(f"--tasks-dir {tasks_dir} is not a directory")
    if limit is not None and limit <= 0:
        raise RotqError(f"--limit must be positive, got {limit}")
    with tempfile.TemporaryDirectory(prefix="rotq-tasks-") as tmp:
        write_builtin_tasks(Path(tmp), [t for t in tasks if t in BUILTIN_TASKS], wikitext2)
        include = [tmp] + ([str(tasks_dir)] if tasks_dir is not None else [])
        manager = TaskManager(include_path=include, include_defaults=False)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise RotqError(f"unknown task(s) {unknown}: built-in tasks are {', '.join(BUILTIN_TASKS)}; "
                            "put the yaml of any other local task in a folder and pass --tasks-dir")
        yield manager


def run_tasks(lm, tasks: list[str], manager, limit: int | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's ``simple_evaluate`` for ``lm`` (an lm-eval LM)."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0)
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and k != "sample_len"}
            for task, metrics in out["results"].items()}


def torch_lm(model, tokenizer, batch_size: int, max_length: int):
    """lm-eval's ``hf`` backend around an already loaded model (the rotq reference included)."""
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)

