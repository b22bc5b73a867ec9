"""One GPU check, one results file: ``bash benchmarks_perf/gpu_check.sh [--cpu] [--out FILE]``.

Sections, each recorded as passed, failed (with its error) or skipped (with its reason), so one broken part
never hides the others:

- ``loss``: the fused Triton loss (reward-map sampling inside) against the float64 reference on the device,
  then timed against the official formula, eager and compiled, and against a device copy of the same bytes
  (``gpu_loss.py``);
- ``attention``: srum's packed attention on the ``sdpa``, ``flex`` and ``xformers`` backends against a float64
  reference on a packed sequence of text, ViT and noised-latent splits, in float32 and bfloat16, and timed;
- ``bf16_fixture``: the packed training forward of the tiny official fixture under bfloat16 autocast, against
  the float32 outputs recorded from the official code (tolerance below);
- ``online_step``: two online SRUM steps of a model at BAGEL-7B's layer width with two decoder layers (1024²
  candidates, self-judged), their peak memory against ``srum plan``'s prediction;
- ``qwen_judge``: the ``vlm`` judge end to end with a tiny random Qwen2.5-VL built from a config, batched scores
  against one-at-a-time scores.

``--cpu`` runs every section that can run without a GPU, at small sizes, checks only (the fused loss in the Triton
interpreter, the online step on the tiny preset measured by ``srum.plan.measure``); CI runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))
from tests.official_fixture import relative_error  # noqa: E402 - the fixture's metric, max|a - e| / max|e|

BF16_TOLERANCE = 3e-2
"""bfloat16 keeps 8 significant bits (a relative step of 2^-8 = 3.9e-3 per rounding); through a few layers the
fixture's outputs may drift to a few times that. Relative to each output's largest value, as the fixture's
float32 bound (1e-4) is."""
FLOAT32_ATTENTION_TOLERANCE = 1e-4
BF16_ATTENTION_TOLERANCE = 2e-2
PLAN_TOLERANCE = 0.15
"""How far ``srum plan``'s peak may be from the measured one (relative)."""


class Skipped(Exception):
    """A section that cannot run here; the message says why."""


# ------------------------------------------------------------------------------------------------- attention

def attention_section(device: str) -> dict:
    from gpu_loss import kernel_milliseconds

    from srum.model.attention import PackedLayout, packed_attention

    scale = 8 if device == "cuda" else 1
    layout = PackedLayout(  # understanding (text, ViT, text), then two text-to-image samples
        sample_lens=[scale * 128, scale * 80, scale * 72],
        split_lens=[scale * 40, scale * 64, scale * 24, scale * 16, scale * 64, scale * 8, scale * 64],
        attn_modes=["causal", "full", "causal", "causal", "noise", "causal", "noise"])
    heads, kv_heads, dim = (28, 4, 128) if device == "cuda" else (4, 2, 16)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(layout.total_len, heads, dim, generator=generator)
    k, v = (torch.randn(layout.total_len, kv_heads, dim, generator=generator) for _ in range(2))
    reference = packed_attention(q.double().to(device), k.double().to(device), v.double().to(device), layout)
    backends = ["sdpa", "flex"]
    if device == "cuda":
        try:
            import xformers  # noqa: F401
            backends.append("xformers")
        except ImportError:
            pass
    results = {"tokens": layout.total_len, "heads": [heads, kv_heads, dim], "runs": []}
    for dtype in ((torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)):
        tolerance = FLOAT32_ATTENTION_TOLERANCE if dtype == torch.float32 else BF16_ATTENTION_TOLERANCE
        inputs = [x.to(device, dtype) for x in (q, k, v)]
        for backend in backends:
            error = relative_error(packed_attention(*inputs, layout, backend=backend), reference)
            run = {"dtype": str(dtype), "backend": backend, "max_rel_error": error, "tolerance": tolerance,
                   "passed": error <= tolerance}
            if device == "cuda":
                run["forward_ms"] = kernel_milliseconds(
                    lambda b=backend, x=inputs: packed_attention(*x, layout, backend=b))
            results["runs"].append(run)
    if not all(run["passed"] for run in results["runs"]):
        raise AssertionError(f"attention: a backend is outside its tolerance: {results['runs']}")
    return results


# ---------------------------------------------------------------------------------------------- bf16 fixture

def bf16_fixture_section(device: str) -> dict:
    folder = Path(os.environ.get("SRUM_SHARED", REPO.parent / "shared")) / "reference/fixtures/bagel-tiny-public"
    if not folder.is_dir():
        raise Skipped(f"{folder}: the official fixture is not here (set SRUM_SHARED)")
    from tests.official_fixture import OfficialFixture

    from srum.model.checkpoint import load_checkpoint

    fixture = OfficialFixture(folder)
    model = load_checkpoint(fixture.folder, config=fixture.config).model.to(device).eval()
    batch, noise = fixture.case_a().to(device), fixture.cases["a.in.noise"].to(device)
    errors = {}
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        out = model(batch, noise=noise)
    for name, value, recorded in (("pred_velocity", out.velocity, "a.out.pred_velocity"),
                                  ("ce_logits", out.logits, "a.out.ce_logits"), ("mse", out.mse(), "a.out.mse"),
                                  ("ce", out.ce(), "a.out.ce"), ("loss", out.loss(), "a.out.loss")):
        errors[name] = relative_error(value.float().cpu(), fixture.cases[recorded])
    if max(errors.values()) > BF16_TOLERANCE:
        raise AssertionError(f"bf16_fixture: relative errors {errors} exceed {BF16_TOLERANCE}")
    return {"max_rel_errors": errors, "tolerance": BF16_TOLERANCE}


# ----------------------------------------------------------------------------------------------- online step

PROMPTS = "a red cube left of a blue ball\ntwo green circles\na yellow square\nthree blue triangles\n"


def _online_run(folder: Path, device: str) -> tuple[list[str], int]:
    """The fit arguments of the section's run and the prompt length the plan assumes (tokens, generous)."""
    import dataclasses

    from srum.model.checkpoint import write_random_checkpoint
    from srum.model.config import BagelConfig

    config = BagelConfig.from_name("bagel-7b-mot" if device == "cuda" else "tiny")
    if device == "cuda":  # BAGEL-7B's layer width, two decoder layers and two ViT layers
        config.llm = dataclasses.replace(config.llm, num_hidden_layers=2)
        config.vit = dataclasses.replace(config.vit, num_hidden_layers=3)
    write_random_checkpoint(folder / "checkpoint", config, dtype=torch.bfloat16 if device == "cuda" else None)
    (folder / "prompts.txt").write_text(PROMPTS)
    size = "1024" if device == "cuda" else "64"
    trainer = (["--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size", "1"] if device == "cuda"
               else ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.devices", "1",
                     "--trainer.strategy", "auto", "--model.activation_checkpointing", "false"])
    args = ["--config", str(REPO / "configs/compbench.yaml"), *trainer, "--model.checkpoint",
            str(folder / "checkpoint"), "--data.prompts", str(folder / "prompts.txt"), "--data.batch_size", "1",
            "--model.rollout.images_per_prompt", "2", "--model.rollout.height", size, "--model.rollout.width", size,
            "--model.rollout.sampler.num_timesteps", "4", "--model.scoring.proposer", "whole"]
    return args, 12


def online_step_section(device: str) -> dict:
    from srum.plan.command import memory_plan, read_run
    from srum.plan.measure import fit_steps, measured_peak

    with tempfile.TemporaryDirectory() as folder:
        args, prompt_tokens = _online_run(Path(folder), device)
        module, run, images, _ = read_run(args, None, None, prompt_tokens, reserve=0)
        planned = memory_plan(run, module.trainable, module.lora).peak(images)
        start = time.perf_counter()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fit_steps(args, steps=2)
            measured = torch.cuda.max_memory_allocated()
        else:
            measured = measured_peak(args, steps=2)
        seconds = time.perf_counter() - start
    gap = planned / measured - 1
    result = {"candidates_per_step": images, "planned_gib": planned / 2**30, "measured_gib": measured / 2**30,
              "plan_vs_measured": gap, "tolerance": PLAN_TOLERANCE, "seconds_for_two_steps": seconds}
    if abs(gap) > PLAN_TOLERANCE:
        raise AssertionError(f"online_step: the plan is {gap:+.1%} off the measured peak: {result}")
    return result


# ------------------------------------------------------------------------------------------------ qwen judge

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def tiny_qwen2_5_vl(folder: Path) -> Path:
    """A random Qwen2.5-VL (2 vision blocks, 2 text layers) with its processor, saved like a downloaded folder."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    from srum.model.tokenizer import build_small_tokenizer

    build_small_tokenizer(folder, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL)}, replace_extra_special_tokens=False)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE).save_pretrained(
        str(folder))
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(str(folder))
    return folder


def qwen_judge_section(device: str) -> dict:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise Skipped("transformers' Qwen2.5-VL processor needs torchvision, which is not installed") from None
    from srum.reward.judges import ScoringConfig, build_judge
    from srum.reward.scorer import ScorerConfig

    with tempfile.TemporaryDirectory() as folder:
        tiny_qwen2_5_vl(Path(folder))
        scoring = ScoringConfig(judge="vlm", vlm_dir=folder, vlm_class="Qwen2_5_VLForConditionalGeneration",
                                proposer="whole", scorer=ScorerConfig(method="expected", score_step=0.5))
        judge = build_judge(scoring, None, device)
        generator = torch.Generator().manual_seed(0)
        images = [torch.randint(0, 256, (56, 56, 3), generator=generator, dtype=torch.uint8) for _ in range(2)]
        prompts = ["a red cube left of a blue ball", "two green circles"]
        records = judge.score(images, prompts, ["0.png", "1.png"])
        alone = judge.score(images[1:], prompts[1:], ["1.png"])
    batched, single = records[1].global_scores.expected, alone[0].global_scores.expected
    if batched is None or not math.isclose(batched, single, rel_tol=0, abs_tol=1e-4):
        raise AssertionError(f"qwen_judge: batched score {batched} differs from the one-image score {single}")
    return {"global_scores": [r.global_scores.expected for r in records],
            "region_scores": [[s.scores.expected for s in r.regions] for r in records],
            "batched_vs_alone_abs_diff": abs(batched - single)}


# --------------------------------------------------------------------------------------------------- driver

def loss_section(device: str) -> dict:
    import gpu_loss

    return gpu_loss.section(device)


SECTIONS: dict[str, Callable[[str], dict]] = {
    "loss": loss_section, "attention": attention_section, "bf16_fixture": bf16_fixture_section,
    "online_step": online_step_section, "qwen_judge": qwen_judge_section}


def run_sections(device: str, names: list[str]) -> dict:
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "sections": {}}
    for name in names:
        start = time.perf_counter()
        try:
            outcome = {"status": "passed", **SECTIONS[name](device)}
        except Skipped as reason:
            outcome = {"status": "skipped", "reason": str(reason)}
        except (Exception, SystemExit) as error:  # noqa: BLE001 - recorded, and the next section still runs
            outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc(limit=6)}
        outcome["seconds"] = time.perf_counter() - start
        results["sections"][name] = outcome
        print(f"gpu_check: {name}: {outcome['status']} ({outcome['seconds']:.0f} s)", flush=True)  # noqa: T201
    return results


def main(args: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run what can run without a GPU (small, checks only)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check.json", help="the results file")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    options = parser.parse_args(args)
    if not options.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; run with --cpu for the parts that need none")
    if options.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = run_sections("cpu" if options.cpu else "cuda", options.sections)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2))
    print(options.out.read_text())  # noqa: T201 - the results file, printed whole at the end
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if any(s["status"] == "failed" for s in outcome["sections"].values()) else 0)
