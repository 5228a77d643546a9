"""lm-evaluation-harness model adapter: `lm_eval --model adaptive-mamba --model_args pretrained=DIR`.

All three request types go through our own scoring code, so harness numbers and the suite's agree:

* `loglikelihood_rolling`: the suite's rolling windows (`score_rolling`, lm-eval's windowing with
  the end-of-text token as prefix);
* `loglikelihood`: the continuation's log-probability after its context (end-of-text when the
  context is empty), context cut from the left to `max_length`, and whether greedy decoding
  would produce it;
* `generate_until`: recurrent generation with stop sequences (`generate_batch`).

Register it once per environment with `python -m adaptive_mamba.evaluation.lm_eval_adapter
install` (writes a `.pth` import hook into site-packages; see `lm_eval_hook.py`). Needs the
optional extra `pip install -e .[lm-eval]`.
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from lm_eval.api.model import LM
from tqdm.auto import tqdm

from .generation import generate_batch
from .likelihood import score_rolling
from .suite import load_model

HOOK = Path(__file__).with_name("lm_eval_hook.py")
PTH_NAME = "adaptive_mamba_lm_eval.pth"
# Runs the stdlib-only hook file of whichever adaptive_mamba is importable, without importing
# the package (and torch) at every interpreter start; a checkout without the file: no-op.
PTH_LINE = ("import importlib.util as _u, os as _o; _s = _u.find_spec('adaptive_mamba'); "
            "_p = _s and _s.submodule_search_locations and _o.path.join("
            "list(_s.submodule_search_locations)[0], 'evaluation', 'lm_eval_hook.py'); "
            "_p and _o.path.isfile(_p) and exec(compile(open(_p).read(), _p, 'exec'), "
            "{'__name__': 'adaptive_mamba_lm_eval_hook'})\n")


class AdaptiveMambaLM(LM):
    """Our model behind lm-eval's `LM` interface (single process)."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int | str = 1, max_length: int = 2048,
                 **_ignored) -> None:
        super().__init__()
        self.model, self.tokenizer = load_model(Path(pretrained), Path(tokenizer) if tokenizer else None,
                                                device, dtype)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_length = int(max_length)
        self._device = next(self.model.parameters()).device

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in rolling windows of `max_length` tokens."""
        docs = self.tokenizer.encode_batch([req.args[0] for req in requests])
        scores = score_rolling(self.model, docs, self.tokenizer.eos_id, self.max_length,
                               self.batch_size, desc="lm-eval rolling")
        return [-s.nll for s in scores]

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding yields the continuation)."""
        out = []
        for req in tqdm(requests, desc="lm-eval loglikelihood", disable=disable_tqdm, leave=False):
            context, continuation = req.args
            # lm-eval convention: spaces between context and continuation belong to the continuation.
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self.tokenizer.encode(context) if context else [self.tokenizer.eos_id]
            cont = self.tokenizer.encode(continuation)
            if not cont:
                out.append((0.0, True))
                continue
            ids = (ctx + cont)[-(self.max_length + 1):]
            inputs = torch.tensor([ids[:-1]], device=self._device)
            hidden = self.model.hidden_states(inputs)[:, -len(cont):]
            logprobs = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)[0]
            target = torch.tensor(cont, device=self._device)
            out.append((float(logprobs.gather(1, target[:, None]).sum()),
                        bool((logprobs.argmax(-1) == target).all())))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when `do_sample`) continuations cut at the `until` strings."""
        out = []
        for req in tqdm(requests, desc="lm-eval generate", disable=disable_tqdm, leave=False):
            context, kwargs = req.args
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            ids = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
            out.append(generate_batch(self.model, self.tokenizer, ids, 1,
                                      int(kwargs.get("max_gen_toks", 256)), until, temperature,
                                      float(kwargs.get("top_p", 1.0)))[0])
        return out


def install_hook(site_dir: Path | None = None) -> Path:
    """Write the `.pth` import hook that registers `adaptive-mamba` with lm-eval."""
    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Register adaptive-mamba with lm-evaluation-harness.")
    parser.add_argument("command", choices=["install"])
    parser.add_argument("--site-dir", type=Path, help="default: this environment's site-packages")
    args = parser.parse_args(argv)
    print(f"wrote {install_hook(args.site_dir)}; now `lm_eval --model adaptive-mamba "
          "--model_args pretrained=DIR ...` works")


if __name__ == "__main__":
    main()
