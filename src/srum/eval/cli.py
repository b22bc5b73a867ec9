"""``srum validate BENCHMARK``: benchmark runs of a checkpoint (and of a baseline, with the difference), and the
difference of two report files. Plain ``srum validate --config ...`` stays LightningCLI's.

A checkpoint's results go to ``OUT/<checkpoint folder name>/``; every stage resumes where a killed run stopped.
"""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from rich.console import Console

from srum.eval import compbench as compbench_scores
from srum.eval import understanding as understanding_scores
from srum.eval.generate import (
    COMPBENCH_GENERATION,
    GENEVAL_GENERATION,
    GenerationSettings,
    generate_images,
    wanted_images,
)
from srum.eval.geneval import read_geneval, write_layout
from srum.eval.judges import DEFAULT_JUDGE_CLASS, Judge, UnifiedJudge, VLMJudge, judge_model_class
from srum.eval.judging import check_retries, judge_folder
from srum.eval.report import comparison_table, make_report, read_report, report_tables, save_report
from srum.generation.device import device_and_dtype
from srum.generation.pipeline import Pipeline
from srum.generation.prompts import read_prompts
from srum.model.checkpoint import LLM_CONFIG, checkpoint_folder
from srum.model.shipped import checkpoint_identity

log = logging.getLogger("srum")
DType = Literal["auto", "float32", "bfloat16"]
SELF = "self"


def _name(path: str | Path) -> str:
    """A folder name for a checkpoint or a judge: its last path part, in safe characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(path).rstrip("/")).name).strip("-") or "model"


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")


def _checkpoints(checkpoint: Path, baseline: Path | None) -> list[Path]:
    """The checkpoints to evaluate, the baseline first."""
    if baseline is None:
        return [checkpoint]
    if _name(baseline) == _name(checkpoint):
        raise ValueError(f"baseline: expected a folder named unlike the checkpoint's (results go to "
                         f"OUT/<folder name>), got {baseline} and {checkpoint}")
    return [baseline, checkpoint]


def _free_memory() -> None:
    """Give a deleted model's memory back before the next one loads (a 14B generator and a 32B judge rarely fit
    together)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _show(reports: list[tuple[str, dict]]) -> None:
    console = Console()
    for title, report in reports:
        for table in report_tables(report, title):
            console.print(table)
    if len(reports) == 2:
        (before_name, before), (after_name, after) = reports
        console.print(comparison_table(before, after, before_name, after_name))


def _check_judge(judge: str, judge_class: str) -> None:
    """Refuse an unusable judge before the images are made, not after."""
    if judge == SELF:
        return
    folder = checkpoint_folder(judge)
    if not folder.is_dir():
        raise FileNotFoundError(f"{judge}: judge folder not found (expected self, a srum checkpoint folder or a "
                                "local transformers model folder)")
    if not (folder / LLM_CONFIG).is_file():
        judge_model_class(judge_class)


def _external_judge(judge: str, judge_class: str, max_judge_tokens: int, device: str, dtype: torch.dtype) -> Judge:
    """A judge other than the evaluated model: a srum checkpoint folder, or a transformers VLM folder."""
    if (checkpoint_folder(judge) / LLM_CONFIG).is_file():
        return UnifiedJudge(Pipeline.from_checkpoint(judge, dtype=dtype, device=device), judge, max_judge_tokens)
    return VLMJudge(Path(judge), judge_class, max_judge_tokens, device, dtype)


def compbench(checkpoint: Path, out: Path, prompts: Path = Path("data/compbench/val_comp.json"),
              generation: GenerationSettings = COMPBENCH_GENERATION, judge: str = SELF,
              judge_class: str = DEFAULT_JUDGE_CLASS, judge_batch_size: int = 1, max_judge_tokens: int = 512,
              judge_retries: int = 2, retry_temperature: float = 0.7, baseline: Path | None = None,
              device: str | None = None, dtype: DType = "auto") -> None:
    """T2I-CompBench under the official SRUM judge protocol: images, 0-100 judgements and the scores.

    Reports per-category means, Complex and Overall, the official-compatible numbers beside srum's.

    Writes OUT/<checkpoint>/compbench-<think|no_think>/ (PNGs, records.jsonl, judgements-<judge>.jsonl) and the
    report OUT/<checkpoint>/compbench-<mode>-<judge>.json; re-running skips what is done.

    Args:
        checkpoint: checkpoint folder (official layout) to evaluate.
        out: output root.
        prompts: T2I-CompBench JSON (Question, Category, Question_id).
        generation: how the images are made.
        judge: ``self`` (each evaluated model judges its own images), a srum checkpoint folder (that model
            judges), or a local transformers vision-language model folder (loaded as judge_class).
        judge_class: transformers class of a VLM judge (Qwen2_5_VLForConditionalGeneration, as the official
            protocol; AutoModelForImageTextToText for others).
        judge_batch_size: images judged together (official: 1).
        max_judge_tokens: decoding budget of each judgement (official: 512).
        judge_retries: times an unreadable judgement is asked again, sampled (the official number is read from
            the first, greedy answer whatever this is).
        retry_temperature: sampling temperature of those re-asks.
        baseline: a second checkpoint evaluated alike (e.g. the model before SRUM); the difference is printed.
        device: cuda or cpu (default: cuda when available).
        dtype: weights dtype (auto: bfloat16 on GPU, float32 on CPU).
    """
    _require_positive(judge_batch_size=judge_batch_size, max_judge_tokens=max_judge_tokens)
    _check_judge(judge, judge_class)
    check_retries(judge_retries, retry_temperature)
    retry = (judge_retries, retry_temperature)
    device, torch_dtype = device_and_dtype(device, dtype)
    prompt_list = read_prompts(prompts)
    judgements_file = f"judgements-{_name(judge)}.jsonl"
    folders: dict[Path, Path] = {}
    judgements: dict[Path, list[dict]] = {}
    for model in _checkpoints(checkpoint, baseline):
        folders[model] = out / _name(model) / f"compbench-{generation.mode}"
        pipeline = Pipeline.from_checkpoint(model, dtype=torch_dtype, device=device)
        generate_images(pipeline, model, prompt_list, folders[model], generation)
        if judge == SELF:
            judgements[model] = judge_folder(UnifiedJudge(pipeline, model, max_judge_tokens), folders[model],
                                             folders[model] / judgements_file, judge_batch_size, *retry)
        del pipeline
        _free_memory()
    if judge != SELF:
        external = _external_judge(judge, judge_class, max_judge_tokens, device, torch_dtype)
        for model, folder in folders.items():
            judgements[model] = judge_folder(external, folder, folder / judgements_file, judge_batch_size, *retry)
    reports = []
    wanted = wanted_images(prompt_list, generation)
    for model, folder in folders.items():
        judgements[model] = [j for j in judgements[model] if j["image_file"] in wanted]  # not earlier runs' extras
        metrics, details = compbench_scores.summarise(judgements[model])
        failed = sum(row["failures"] for row in details.values())
        re_asked = sum(bool(judgement.get("failed_answers")) for judgement in judgements[model])
        details["all"] = {"images": len(judgements[model]), "failures": failed, "re_asked": re_asked}
        run = {"checkpoint": checkpoint_identity(model), "prompts": str(prompts), "images": str(folder),
               "generation": generation.as_record(),
               "judge": judgements[model][0]["settings"] if judgements[model] else None,
               "re_ask": {"retries": judge_retries, "temperature": retry_temperature}}
        report = make_report("t2i-compbench", run, metrics, details, [compbench_scores.AGGREGATION])
        path = folder.parent / f"compbench-{generation.mode}-{_name(judge)}.json"
        save_report(path, report)
        log.info("wrote %s (%d judgements, %d re-asked, %d still failed)", path, len(judgements[model]), re_asked,
                 failed)
        reports.append((f"{_name(model)} ({generation.mode}, judge {_name(judge)})", report))
    _show(reports)


def geneval(checkpoint: Path, out: Path, metadata: Path = Path("data/geneval/evaluation_metadata.jsonl"),
            generation: GenerationSettings = GENEVAL_GENERATION, device: str | None = None,
            dtype: DType = "auto") -> None:
    """GenEval images (N per prompt, fixed seeds), laid out for GenEval's own evaluator.

    Writes OUT/<checkpoint>/geneval-<think|no_think>/ (PNGs, records.jsonl), its geneval/ subfolder in GenEval's
    layout (<index>/metadata.jsonl, <index>/samples/<n>.png) and a report of the counts per tag; re-running skips
    what is done.

    Args:
        checkpoint: checkpoint folder (official layout).
        out: output root.
        metadata: GenEval metadata JSONL (prompt, tag, include, exclude).
        generation: how the images are made (default: BAGEL's GenEval harness, 4 images per prompt).
        device: cuda or cpu (default: cuda when available).
        dtype: weights dtype (auto: bfloat16 on GPU, float32 on CPU).
    """
    device, torch_dtype = device_and_dtype(device, dtype)
    prompts = read_geneval(metadata)
    folder = out / _name(checkpoint) / f"geneval-{generation.mode}"
    pipeline = Pipeline.from_checkpoint(checkpoint, dtype=torch_dtype, device=device)
    generate_images(pipeline, checkpoint, [prompt.as_prompt() for prompt in prompts], folder, generation)
    added = write_layout(folder, prompts, folder / "geneval")
    details: dict[str, dict] = {}
    for prompt in prompts:
        row = details.setdefault(prompt.tag, {"prompts": 0, "images": 0})
        row["prompts"] += 1
        row["images"] += len(list((folder / "geneval" / prompt.prompt_id / "samples").glob("*.png")))
    metrics = {"All": {"prompts": len(prompts), "images": sum(row["images"] for row in details.values())}}
    run = {"checkpoint": checkpoint_identity(checkpoint), "metadata": str(metadata), "images": str(folder),
           "layout": str(folder / "geneval"), "generation": generation.as_record()}
    notes = ["scores come from GenEval's detector-based evaluator run on the layout folder"]
    path = folder.parent / f"geneval-{generation.mode}.json"
    report = make_report("geneval", run, metrics, details, notes)
    save_report(path, report)
    log.info("wrote %s (%d images newly laid out in %s)", path, added, folder / "geneval")
    _show([(f"{_name(checkpoint)} geneval ({generation.mode})", report)])


def understanding(checkpoint: Path, questions: Path, out: Path,
                  method: understanding_scores.Method = "logprob", batch_size: int = 8, max_new_tokens: int = 16,
                  baseline: Path | None = None, device: str | None = None, dtype: DType = "auto") -> None:
    """Multiple-choice visual questions (MMVP-style): does the model still understand what it sees?

    The check that SRUM did not harm understanding: run it before and after, or give --baseline.

    Writes OUT/<checkpoint>/understanding-<questions file>-<method>.jsonl (one prediction a question) and a report
    beside it; re-running skips what is answered.

    Args:
        checkpoint: checkpoint folder (official layout).
        questions: JSONL of {image, question, options, answer} records (optional id, category, pair).
        out: output root.
        method: logprob (the option letter of highest log-probability) or decode (a greedy answer, read).
        batch_size: questions answered together.
        max_new_tokens: with decode, the answer's budget.
        baseline: a second checkpoint evaluated alike; the difference is printed.
        device: cuda or cpu (default: cuda when available).
        dtype: weights dtype (auto: bfloat16 on GPU, float32 on CPU).
    """
    _require_positive(batch_size=batch_size, max_new_tokens=max_new_tokens)
    device, torch_dtype = device_and_dtype(device, dtype)
    question_list = understanding_scores.read_questions(questions)
    ids = {question.question_id for question in question_list}
    reports = []
    for model in _checkpoints(checkpoint, baseline):
        pipeline = Pipeline.from_checkpoint(model, dtype=torch_dtype, device=device)
        path = out / _name(model) / f"understanding-{_name(questions.stem)}-{method}.jsonl"
        settings = {"checkpoint": checkpoint_identity(model), "questions": str(questions.resolve())}
        predictions = understanding_scores.answer_questions(pipeline, question_list, path, method, batch_size,
                                                            max_new_tokens, settings)
        del pipeline
        _free_memory()
        metrics, details = understanding_scores.summarise([p for p in predictions if p["id"] in ids])
        report = make_report("understanding", {**settings, "method": method, "predictions": str(path)}, metrics,
                             details, ["accuracy in percent; an unreadable answer counts as wrong"])
        save_report(path.with_suffix(".json"), report)
        log.info("wrote %s", path.with_suffix(".json"))
        reports.append((f"{_name(model)} understanding ({method})", report))
    _show(reports)


def compare(before: Path, after: Path) -> None:
    """Print the difference of two ``srum validate`` reports (after - before, row by row).

    Args:
        before: the earlier report (e.g. the base model's).
        after: the later report (e.g. after SRUM).
    """
    Console().print(comparison_table(read_report(before), read_report(after), str(before), str(after)))


BENCHMARKS = {"compbench": compbench, "geneval": geneval, "understanding": understanding}
EVAL_COMMANDS = {**BENCHMARKS, "compare": compare}
"""``srum validate <name>``."""


def run_validate(args: list[str]) -> None:
    """``srum validate BENCHMARK [options]`` or ``srum validate compare BEFORE AFTER``."""
    if args[0] not in EVAL_COMMANDS:
        raise ValueError(f"validate {args[0]}: expected one of {', '.join(EVAL_COMMANDS)} (or LightningCLI's "
                         "srum validate --config ...)")
    if args[0] == "compare":
        CLI(compare, args=args[1:], as_positional=True, prog="srum validate compare")
    else:
        CLI(BENCHMARKS, args=args, as_positional=False, prog="srum validate")
