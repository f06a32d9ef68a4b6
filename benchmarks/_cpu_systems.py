"""cpu_generate's systems: the shared workload, one adapter per system, and the worker that measures one.

The worker runs in a fresh subprocess per system (cpu_generate.py --worker NAME), so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import time
import traceback
from pathlib import Path

from _bench_util import contention, cpu_snapshot, dist_version, peak_rss_mb, rss_mb, timed

ALL_SYSTEMS = ("ours", "ours-none", "ours-int8", "hf", "llamacpp")
OURS = ("ours", "ours-none", "ours-int8")  # longserve: default (GGUF blocks), exact fp32, int8 decode matmuls
LABELS = {
    "ours": "longserve (default: GGUF blocks)",
    "ours-none": "longserve exact fp32",
    "ours-int8": "longserve int8",
    "hf": "HF transformers",
    "llamacpp": "llama.cpp",
}

PASSAGE = (
    "Paris is the capital and largest city of France. Situated on the river Seine, in the north of the "
    "country, it is at the heart of the Ile-de-France region. The city has been one of the major centres "
    "of finance, diplomacy, commerce, culture, fashion and gastronomy for centuries. For its leading role "
    "in the arts and sciences, as well as its early and extensive system of street lighting, in the "
    "nineteenth century it became known as the City of Light. The history of Paris begins with a Celtic "
    "people, the Parisii, who settled on an island in the river around the third century before the "
    "common era. The Romans conquered the area in 52 BC and built a town they called Lutetia, with a "
    "forum, baths, temples and an amphitheatre. By the end of the twelfth century, Paris had become the "
    "political, economic, religious and cultural capital of France. The university, founded around 1200, "
    "drew students from across Europe. During the French Revolution the city was the stage of the storming "
    "of the Bastille and of the fall of the monarchy. In the nineteenth century, Baron Haussmann rebuilt "
    "much of the centre with wide boulevards, parks and a new system of sewers and aqueducts, and the "
    "railways made Paris the hub of the national network. The Eiffel Tower was completed for the world "
    "fair of 1889 and, although many artists at first disliked it, it has become the symbol of the city. "
    "Today the metropolitan area has more than twelve million inhabitants. Its museums, among them the "
    "Louvre, the Musee d'Orsay and the Centre Pompidou, receive tens of millions of visitors every year, "
    "and its airports, railway stations and metro carry several million travellers each day. Water "
    "quality, housing costs and traffic remain hard problems for the city government, which has planted "
    "trees, opened cycle lanes along the quays and closed some roads to cars in recent years. "
)


# ----------------------------------------------------------------------------------------------------
# workload: the same token ids for every system
# ----------------------------------------------------------------------------------------------------


def token_pool(model_path: Path, min_len: int) -> tuple[list[int], str]:
    """Token ids of real English text (HF tokenizer read from the GGUF); pseudo-random ids if unavailable."""
    try:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
        text = PASSAGE
        ids = tok(text, add_special_tokens=False)["input_ids"]
        while len(ids) < min_len:
            text += PASSAGE
            ids = tok(text, add_special_tokens=False)["input_ids"]
        return list(ids), "text"
    except Exception as e:  # any failure: fall back to synthetic ids
        print(f"[bench] tokenizer unavailable ({type(e).__name__}: {e}); using pseudo-random token ids")
        rng = random.Random(0)
        return [rng.randrange(1000, 40000) for _ in range(min_len)], "random"


def build_workload(args: argparse.Namespace, model_path: Path) -> dict:
    n_conc = args.concurrency
    lo, hi = args.conc_prompt_min, args.conc_prompt_max
    conc_lens = [lo + round(i * (hi - lo) / max(n_conc - 1, 1)) for i in range(n_conc)]
    n_long = args.prefill_repeats
    need = max(args.long_prompt + 37 * n_long, hi + 11 * n_conc, args.short_prompt + 1) + 1
    pool, source = token_pool(model_path, need)
    return {
        "token_source": source,
        "short_prompt": pool[: args.short_prompt],
        # different prompts for each prefill repetition: a prefix cache must not help
        "long_prompts": [pool[37 * r : 37 * r + args.long_prompt] for r in range(n_long)],
        "concurrent_prompts": [pool[11 * i : 11 * i + n] for i, n in enumerate(conc_lens)],
        "new_tokens": args.new_tokens,
        "decode_repeats": args.decode_repeats,
        "threads": args.threads,
        "model": str(model_path),
    }


# ----------------------------------------------------------------------------------------------------
# system adapters (run inside the worker subprocess)
# ----------------------------------------------------------------------------------------------------


class Ours:
    """longserve's offline API; token-id prompts go in as they are (no chat template)."""

    mode_concurrent = "all submitted at once"

    def __init__(self, spec: dict, quantization: str | None):
        import torch

        torch.set_num_threads(spec["threads"])
        from longserve import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(model=None, quantization=quantization, num_threads=spec["threads"])
        config = self.llm.engine.config
        self.info = {
            "longserve": dist_version("longserve"),
            "torch": torch.__version__,
            "dtype": config.dtype,
            "quantization": config.quantization,
            "num_threads": config.num_threads,
            "int8_matmuls": _int8_matmuls(self.llm.engine.model),
        }

    def _params(self, k: int):
        return self.SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)

    def generate_many(self, prompts: list[list[int]], k: int) -> list[list[int]]:
        outs = self.llm.generate(prompts, self._params(k))
        return [list(o.outputs[0].token_ids) for o in outs]

    def generate_one(self, prompt: list[int], k: int) -> list[int]:
        return self.generate_many([prompt], k)[0]


def _int8_matmuls(model) -> str | None:
    """'int8 kernels/all prepared matmuls' (int8 falls back to fp32 without fbgemm); None if unknown."""
    try:
        kernels = [getattr(m, "kernel", None) for m in model.modules()]
        kernels.append(getattr(model, "lm_head_kernel", None))
        kernels = [k for k in kernels if hasattr(k, "packed_int8")]
        return f"{sum(k.packed_int8 is not None for k in kernels)}/{len(kernels)}" if kernels else None
    except Exception:
        return None


class HF:
    mode_concurrent = "one left-padded batch, generate()"

    def __init__(self, spec: dict):
        import torch

        torch.set_num_threads(spec["threads"])
        from transformers import AutoModelForCausalLM

        path = Path(spec["model"])
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        cfg = self.model.generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        self.pad = int(pad[0] if isinstance(pad, list) else pad)
        import transformers

        self.info = {"transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32"}

    def _generate(self, input_ids, attention_mask, k: int):
        with self.torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=self.pad,
            )

    def generate_one(self, prompt: list[int], k: int) -> list[int]:
        ids = self.torch.tensor([prompt], dtype=self.torch.long)
        out = self._generate(ids, self.torch.ones_like(ids), k)
        return out[0, len(prompt) :].tolist()

    def generate_many(self, prompts: list[list[int]], k: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = self.torch.full((len(prompts), width), self.pad, dtype=self.torch.long)
        mask = self.torch.zeros((len(prompts), width), dtype=self.torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = self.torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = self._generate(ids, mask, k)
        return [row.tolist() for row in out[:, width:]]


class LlamaCpp:
    mode_concurrent = "sequential: one request after another"

    def __init__(self, spec: dict):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=spec["model"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            n_ctx=2048,
            n_batch=512,
            verbose=False,
        )
        self.info = {"llama_cpp_python": llama_cpp.__version__, "n_ctx": 2048, "n_batch": 512}

    def generate_one(self, prompt: list[int], k: int) -> list[int]:
        self.llm.reset()  # no prefix reuse between calls
        out: list[int] = []
        for tok in self.llm.generate(prompt, temp=0.0, reset=True):
            out.append(int(tok))  # EOS is not special here: like ignore_eos
            if len(out) >= k:
                break
        return out

    def generate_many(self, prompts: list[list[int]], k: int) -> list[list[int]]:
        return [self.generate_one(p, k) for p in prompts]


ADAPTERS = {
    "ours": lambda spec: Ours(spec, quantization=None),
    "ours-none": lambda spec: Ours(spec, quantization="none"),
    "ours-int8": lambda spec: Ours(spec, quantization="int8"),
    "hf": HF,
    "llamacpp": LlamaCpp,
}


def missing_requirement(system: str) -> str | None:
    """Why `system` cannot run in this environment (checked before spawning), or None."""
    need = {
        "ours": ["longserve", "torch"],
        "ours-none": ["longserve", "torch"],
        "ours-int8": ["longserve", "torch"],
        "hf": ["transformers", "torch", "accelerate", "gguf"],
        "llamacpp": ["llama_cpp"],
    }[system]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    hint = "pip install -e ." if system in OURS else "pip install -e '.[bench]' (make bench)"
    return f"not installed: {', '.join(missing)}; {hint}"


# ----------------------------------------------------------------------------------------------------
# worker: measures one system, writes JSON after every phase (a crash keeps what was measured)
# ----------------------------------------------------------------------------------------------------


def run_worker(system: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res: dict = {"system": system, "ok": False}

    def save():
        res["peak_rss_mb"] = peak_rss_mb()
        Path(result_path).write_text(json.dumps(res))

    def phase(name, fn):
        before = cpu_snapshot()
        try:
            res[name] = fn()
            res[name]["contention"] = contention(before)
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        save()

    n = spec["new_tokens"]
    short, longs, conc = spec["short_prompt"], spec["long_prompts"], spec["concurrent_prompts"]
    try:
        t_load, sysobj = timed(ADAPTERS[system], spec)
    except Exception as e:
        res["error"] = f"load failed: {type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()
        save()
        return 1
    res.update(load_s=t_load, rss_after_load_mb=rss_mb(), info=sysobj.info)
    save()

    def warmup():
        t0 = time.perf_counter()
        sysobj.generate_one(short, 4)
        sysobj.generate_one(longs[0][: len(longs[0]) // 2], 2)
        sysobj.generate_many(conc[:2], 2)
        return {"s": time.perf_counter() - t0}

    def single():
        reps = spec["decode_repeats"]
        t1 = [timed(sysobj.generate_one, short, 1)[0] for _ in range(reps + 1)]
        tn, tokens = [], []
        for _ in range(reps):
            dt, tokens = timed(sysobj.generate_one, short, n)
            tn.append(dt)
            if len(tokens) != n:
                raise RuntimeError(f"asked for {n} new tokens, got {len(tokens)}")
        d1, dn = statistics.median(t1), statistics.median(tn)
        return {
            "prompt_len": len(short),
            "new_tokens": n,
            "t1_s": t1,
            "tN_s": tn,
            "decode_tok_s": (n - 1) / (dn - d1),
            "tokens": tokens,
        }

    def prefill():
        ttft = []
        for p in longs:
            dt, out = timed(sysobj.generate_one, p, 1)
            if len(out) != 1:
                raise RuntimeError(f"asked for 1 new token, got {len(out)}")
            ttft.append(dt)
        med = statistics.median(ttft)
        return {
            "prompt_len": len(longs[0]),
            "ttft_s": ttft,
            "ttft_median_s": med,
            "prompt_tok_s": len(longs[0]) / med,
        }

    def concurrent():
        dt, outs = timed(sysobj.generate_many, conc, n)
        lens = [len(o) for o in outs]
        if len(outs) != len(conc) or any(x != n for x in lens):
            raise RuntimeError(f"asked for {len(conc)} x {n} new tokens, got {lens}")
        total = sum(lens)
        return {
            "num_requests": len(conc),
            "prompt_lens": [len(p) for p in conc],
            "new_tokens": n,
            "mode": sysobj.mode_concurrent,
            "elapsed_s": dt,
            "output_tokens": total,
            "agg_tok_s": total / dt,
        }

    phase("warmup", warmup)
    phase("single", single)
    phase("prefill", prefill)
    phase("concurrent", concurrent)
    res["ok"] = all("error" not in res[k] for k in ("warmup", "single", "prefill", "concurrent"))
    save()
    return 0
