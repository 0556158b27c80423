"""EleutherAI's lm-evaluation-harness on ouvert models: an `LM` registered as "ouvert".

lm_eval's own command does not import ouvert, and lm-eval 0.4.13 reads no plugin entry points for
models (lm_eval.api.registry fills its table from lm_eval.models.MODEL_MAPPING only). So run it
through this module, which registers the model and then hands the arguments to lm_eval's CLI:

    python -m ouvert.eval.lm_eval --model ouvert --model_args path=DIR[,dtype=float32,device=cpu,max_length=2048] \\
        --tasks hellaswag --batch_size 8 [--include_path DIR_OF_TASK_YAMLS] [--output_path OUT]

Everything after `python -m ouvert.eval.lm_eval` is lm_eval's usual command line. From Python,
`import ouvert.eval.lm_eval` and pass model="ouvert" to lm_eval.simple_evaluate, or an OuvertLM.

The three request types go to ouvert.eval.score, the same code `ouvert eval` uses, so lm-eval
and `ouvert eval` give the same numbers on the same data. The one departure from lm-eval's HF
model: every sequence starts with BOS (EOS if the tokenizer has none), like HFLM with
add_bos_token=True (see score.py). Generation is greedy unless a task asks for do_sample with a
temperature.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  registers lm-eval's own models first; registering ours after keeps them
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ouvert.eval import score
from ouvert.eval.run import EvalConfig, load


@register_model("ouvert")
class OuvertLM(LM):
    def __init__(self, path: str, tokenizer: str | None = None, dtype: str | None = None, device: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, **_ignored) -> None:
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's --device defaults to cuda:0 even where there is none; run on the CPU then.
            print(f"ouvert: no CUDA device; running on the CPU instead of {device}", file=sys.stderr)
            device = "cpu"
        self.model, self.tok = load(EvalConfig(model=path, tasks=[], tokenizer=tokenizer, dtype=dtype, device=device))
        # lm-eval passes "auto" or "auto:N" to ask for a search we do not do; take 8 then.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = score.max_length(self.model, int(max_length) if max_length else None)
        self.path = path

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> OuvertLM:
        # lm-eval adds its own --device / --batch_size (device defaults to cuda:0); what --model_args
        # says wins, instead of a "multiple values for keyword argument" error.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> OuvertLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def tokenizer_name(self) -> str:  # lm-eval keys its request cache by this
        return str(self.tok.source or self.path)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return score.loglikelihoods(self.model, self.tok, [r.args for r in requests], self.batch_size,
                                    self.max_length)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # Disjoint windows (stride = window), as lm-eval's own models score rolling log-likelihoods.
        ids = [self.tok.encode(r.args[0], add_special_tokens=False) for r in requests]
        return score.rolling_loglikelihood(self.model, ids, score.prefix_id(self.tok), self.batch_size,
                                           self.max_length, self.max_length)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests differ in their stop strings and lengths: run each group of equal settings as a batch.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            _, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            key = (tuple(until), int(kw.get("max_gen_toks", 256)), temperature)
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for (until, max_new, temperature), idx in groups.items():
            texts = score.greedy_generate(self.model, self.tok, [requests[i].args[0] for i in idx], max_new,
                                          until, self.batch_size, temperature=temperature, seed=0)
            for i, t in zip(idx, texts):
                out[i] = t
        return out


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the "ouvert" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
