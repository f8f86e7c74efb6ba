"""`cl-scale train`: every task of the order on a DeepSpeed engine, one stage after another.

Per stage: grow the method's branch/gate, build a fresh engine over exactly the trainable parameters,
let the method run its data passes, train the epochs, let it extend its bases, snapshot, evaluate the
tasks seen so far, tear the engine down, record the stage. Every rank runs the same code; only rank 0
prints and writes. Each stage seeds the global RNG (dropout) itself, so a resumed stage repeats an
uninterrupted one exactly; with train.checkpoint_every_steps, or on SIGUSR1/SIGTERM, it also checkpoints
its engine inside the task and --resume goes on from the newest checkpoint (cl_scale.checkpoint).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import cl_scale
from cl_scale import atomic
from cl_scale import checkpoint
from cl_scale import distributed as dist_utils
from cl_scale import rundir
from cl_scale.cache import cache_root
from cl_scale.continual_state import build_state, restore_stage, stage_generator
from cl_scale.data.chat import check_chat_template
from cl_scale.data.orders import resolve_tasks
from cl_scale.data.pipeline import prepare_task
from cl_scale.data.tasks import check_tasks
from cl_scale.distributed import ZeroAccess
from cl_scale.ds_config import build_ds_config
from cl_scale.errors import CLScaleError, StopRequested
from cl_scale.evaluation.generation import evaluate_task
from cl_scale.evaluation.metrics import compute_metrics
from cl_scale.evaluation.report import matrix_table, write_matrix_files
from cl_scale.init_adapter import start_from_adapter
from cl_scale.modeling.loading import load_tokenizer
from cl_scale.plan import task_steps
from cl_scale.progress import Bar, ReportedBatches, Reporter, format_duration
from cl_scale.recipe import diff_recipes, recipe_to_dict, recipe_to_yaml
from cl_scale.rundir import METHOD_STATE, SNAPSHOT, TRAIN_LOG
from cl_scale.sharding import even_shards, rank_share, step_micro_batches
from cl_scale.stage_results import run_matrix, write_stage_results
from cl_scale.stage_runner import ShardBatches, StageRunner
from cl_scale.tracking import Tracker, engine_config, open_tracker, require_monitor_packages
from cl_scale.training_log import (
    LiveStepLog,
    resident_memory_mb,
    step_record,
)
from cl_scale.warnings_filter import quiet_known_warnings

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from rich.console import Console

    from cl_scale.continual_state import ContinualState
    from cl_scale.data.pipeline import TaskRows
    from cl_scale.evaluation.generation import TaskResult
    from cl_scale.methods.base import Method
    from cl_scale.modeling.wrapper import ContinualModel
    from cl_scale.recipe import Recipe
    from cl_scale.rundir import RunDir


@dataclass
class Session:
    """Everything that lives for the whole run (all stages)."""

    recipe: Recipe
    run: RunDir
    tasks: list[str]
    state: ContinualState
    ds_config: dict[str, Any]
    cache_dir: Path
    console: Console
    tracker: Tracker | None
    reporter: Reporter
    planned_steps: list[int | None]
    """Optimizer steps of every stage, for the run's ETA (rank 0; None where unknown)."""

    @property
    def model(self) -> ContinualModel:
        return self.state.model

    @property
    def method(self) -> Method:
        return self.state.method


def run_training(recipe: Recipe, *, resume: bool, run_dir: str | Path | None, allow_changed_recipe: bool) -> Path:
    """Train the whole task sequence of `recipe`; returns the run directory."""
    import datasets

    datasets.disable_progress_bars()
    session: Session | None = None
    try:
        with dist_utils.process_group(recipe.train.collective_timeout_s):
            quiet_known_warnings(main=dist_utils.is_main())
            tasks = resolve_tasks(recipe.data.order, recipe.data.tasks)
            check_tasks(recipe.data, tasks)
            if recipe.data.chat_template:
                check_chat_template(load_tokenizer(recipe.model), recipe.data)
            ds_config = build_ds_config(recipe, dist_utils.world_size())
            require_monitor_packages(recipe, ds_config)
            path = Path(run_dir) if run_dir is not None else Path(recipe.output.dir) / recipe.name
            run = _open_run_dir(recipe, path, tasks, resume=resume, allow_changed_recipe=allow_changed_recipe)
            session = _start_session(recipe, run, tasks, ds_config)
            start = _restore(session)
            for index in range(start, len(tasks)):
                _train_stage(session, index)
            _final_report(session)
        return path
    finally:
        if session is not None and session.tracker is not None:
            session.tracker.close()


def _versions() -> dict[str, str]:
    import datasets
    import deepspeed
    import transformers

    return {
        "cl_scale": cl_scale.__version__,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }


def _open_run_dir(recipe: Recipe, path: Path, tasks: list[str], *, resume: bool, allow_changed_recipe: bool) -> RunDir:
    """Create the run directory, or reopen it for --resume after checking the recipe did not change."""
    session = {
        "world_size": dist_utils.world_size(),
        "global_batch": recipe.train.global_batch,
        "per_device_batch": recipe.train.per_device_batch,
        "seed": recipe.train.seed,
        "versions": _versions(),
        "accelerator": dist_utils.accelerator_description(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def open_or_create() -> dict[str, Any]:
        if not resume:
            manifest = {
                "name": recipe.name,
                "method": recipe.method.name,
                "order": recipe.data.order,
                "tasks": tasks,
                **{k: session[k] for k in ("world_size", "global_batch", "per_device_batch", "seed", "versions")},
                "sessions": [session],
            }
            return rundir.create_run(path, recipe_to_yaml(recipe), manifest).manifest
        run = rundir.open_run(path)
        changes = diff_recipes(run.recipe_dict(), recipe_to_dict(recipe))
        if changes and not allow_changed_recipe:
            raise CLScaleError(
                f"the recipe differs from the one {path} was started with:\n    " + "\n    ".join(changes),
                "resume with the original recipe, or pass --allow-changed-recipe if the change is intended",
            )
        run.discard_unfinished()
        resumed = {**session, "recipe_changes": changes, "resumed_from": _resume_point(run, recipe)}
        run.manifest.setdefault("sessions", []).append(resumed)
        run.save_manifest()
        return run.manifest

    # rank 0 owns the manifest; the others get its copy instead of reading a file that may lag behind
    return rundir.RunDir(path, dist_utils.run_on_main(open_or_create))


def _resume_point(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    """Where a resumed session picks up: the first stage not committed (0-based index, as in `stages`),
    its task (None when every stage is done) and the optimizer steps of it already done."""
    index = run.finished_prefix()
    if index == len(run.tasks):
        return {"index": index, "task": None, "step": 0}
    resumable = checkpoint.newest_complete(
        run.in_progress_dir(index) / checkpoint.CHECKPOINT_DIR, checkpoint.layout(recipe)
    )
    return {"index": index, "task": run.tasks[index], "step": 0 if resumable is None else resumable.step}


def _start_session(recipe: Recipe, run: RunDir, tasks: list[str], ds_config: dict[str, Any]) -> Session:
    from rich.console import Console

    console = Console(quiet=not dist_utils.is_main())
    tracker = open_tracker(recipe, ds_config, run.path)
    ds_config = engine_config(ds_config)  # the run's tracker owns the monitors, not each stage's engine
    state = build_state(recipe, ds_config, len(tasks))
    if recipe.train.gradient_checkpointing:
        state.model.enable_gradient_checkpointing()
    reporter = Reporter(console, interval_s=recipe.train.log_interval_s, enabled=dist_utils.is_main())
    planned = task_steps(recipe, tasks) if dist_utils.is_main() else [None] * len(tasks)
    return Session(recipe=recipe, run=run, tasks=tasks, state=state, ds_config=ds_config,
                   cache_dir=cache_root() / "tokenized", console=console,
                   tracker=tracker, reporter=reporter, planned_steps=planned)


def _restore(session: Session) -> int:
    """Re-create the finished stages from the last snapshot; returns the first stage to train."""
    start = session.run.finished_prefix()
    if start > 0:
        restore_stage(session.state, session.recipe, session.run.stage_dir(start - 1), start - 1)
        session.console.print(f"[bold]resuming[/] {session.run.path} at stage {start + 1}/{len(session.tasks)}")
    return start


def _lr_lambda(warmup_steps: int):
    """Linear warm-up, then constant (the published runs used a constant rate)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _parameter_counts(model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> dict[str, Any]:
    """Total, trainable and every rank's resident parameter counts (partitions under ZeRO-3). Collective."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    resident = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    return {
        "total": total,
        "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
        "resident_per_rank": [int(n) for n in dist_utils.per_rank(resident)],
    }


def _stage_label(session: Session, index: int) -> str:
    return f"stage {index + 1}/{len(session.tasks)} {session.tasks[index]}"


def _run_remaining_s(session: Session, index: int, bar: Bar) -> float | None:
    """This stage's remaining time plus the later stages' steps at this stage's rate (training only)."""
    later = session.planned_steps[index + 1:]
    remaining, per_step = bar.remaining_s(), bar.seconds_per_item()
    if remaining is None or per_step is None or None in later:
        return None
    return remaining + per_step * sum(later)  # type: ignore[arg-type]


@dataclass
class StageOutcome:
    """What a stage's engine produced, kept (on CPU) after the engine is gone."""

    snapshot: dict[str, torch.Tensor]
    log: list[dict[str, Any]]
    results: dict[str, TaskResult]
    counts: dict[str, Any]
    stop_after_commit: bool = False
    """A stop signal came after training with checkpoints off: the stage was finished, the run stops now."""


def _train_stage(session: Session, index: int) -> None:
    recipe, task = session.recipe, session.tasks[index]
    session.console.rule(f"[bold]stage {index + 1}/{len(session.tasks)}: {task}")
    torch.manual_seed(recipe.train.seed + index)  # dropout: a resumed stage draws what an uninterrupted one does
    train_rows = dist_utils.main_first(
        prepare_task, recipe.data, recipe.train.seed, session.state.tokenizer, session.state.kind, task, "train",
        prompts_only=False, cache_dir=session.cache_dir,
    )
    outcome = _run_engine(session, index, train_rows)
    gc.collect()  # measured once the engine is gone, so growth from stage to stage is what engines leave behind
    rss = resident_memory_mb()
    memory = None if rss is None else [round(m, 1) for m in dist_utils.per_rank(rss)]
    session.run.manifest = dist_utils.run_on_main(_commit_stage, session, index, outcome, memory)
    if outcome.results:
        if session.tracker is not None:
            steps = sum(s["steps"] for s in session.run.manifest["stages"] if s["index"] <= index)
            session.tracker.log_scores({t: r.score for t, r in outcome.results.items()}, steps)
        _print_matrix(session)
    if outcome.stop_after_commit:
        session.console.print(f"stopped by a signal after stage {index + 1} ({task}) was committed: "
                              "--resume goes on with the next stage")
        raise StopRequested


def _run_engine(session: Session, index: int, train_rows: TaskRows) -> StageOutcome:
    """Everything that needs stage `index`'s DeepSpeed engine, which is torn down on every exit path."""
    recipe = session.recipe
    session.method.grow(index, stage_generator(recipe, index))
    trainable = session.method.trainable_parameters(index)
    if index == 0 and recipe.model.init_adapter is not None:
        start_from_adapter(session.model, recipe, trainable)
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe.train.warmup_steps))
    with checkpoint.StopSignal() as stop, dist_utils.deepspeed_engine(
        session.model, session.ds_config, optimizer=optimizer, lr_scheduler=scheduler
    ) as engine:
        counts = _parameter_counts(session.model, trainable)
        session.console.print(
            f"parameters: total {counts['total']:,}  trainable {counts['trainable']:,}  "
            f"resident per rank {', '.join(f'{n:,}' for n in counts['resident_per_rank'])}"
        )
        shards = even_shards(
            len(train_rows.rows), batch_size=recipe.train.per_device_batch,
            world_size=dist_utils.world_size(), rank=dist_utils.rank(),
        )
        batches = ReportedBatches(ShardBatches(train_rows, shards), len(shards), session.reporter,
                                  f"{_stage_label(session, index)} data pass")
        runner = StageRunner(index, len(session.tasks), ZeroAccess(), engine, batches)
        session.method.before_task(runner)
        log = _train_epochs(session, engine, runner, train_rows, stop)
        after = _AfterTraining(session, stop, index)
        after.check()
        session.method.after_task(runner)
        after.check()
        snapshot = _snapshot(session)
        results = _evaluate_stage(session, engine, index, after.check)
        return StageOutcome(snapshot, log, results, counts, stop_after_commit=after.deferred)


class _AfterTraining:
    """Stop signals between the phases that follow a stage's training (its data pass, each evaluation cell).

    Every rank asks at the same points and gets the same answer. With checkpoints on, training's last step
    is saved, so the run stops at once and `--resume` repeats only these phases; with them off there is
    nothing to resume inside the stage, so it is finished and committed first.
    """

    def __init__(self, session: Session, stop: checkpoint.StopSignal, index: int) -> None:
        self.session, self.stop, self.index = session, stop, index
        self.deferred = False

    def check(self) -> None:
        """Collective: raise StopRequested (checkpoints on) or note the stop for after the commit."""
        if self.deferred or not self.stop.agreed():
            return
        task = self.session.tasks[self.index]
        if self.session.recipe.train.checkpoint_every_steps:
            self.session.console.print(f"stopped by a signal after training {task}: its last step's checkpoint "
                                       "stands, --resume goes on from there")
            raise StopRequested
        self.deferred = True


def _train_epochs(
    session: Session, engine: DeepSpeedEngine, runner: StageRunner, train_rows: TaskRows, stop: checkpoint.StopSignal
) -> list[dict[str, Any]]:
    """The stage's optimizer steps from its newest checkpoint on; with checkpoints on, the last step is saved
    too, so a stop after training (data pass, evaluation) does not repeat any step."""
    recipe, task = session.recipe, session.tasks[runner.task_index]
    epochs = recipe.train.epochs_for(task)
    world, rank = dist_utils.world_size(), dist_utils.rank()
    plans = [
        step_micro_batches(
            len(train_rows.rows), global_batch=recipe.train.global_batch,
            per_device_batch=recipe.train.per_device_batch, epoch=epoch, seed=recipe.train.seed,
        )
        for epoch in range(epochs)
    ]
    accumulation = engine.gradient_accumulation_steps()
    total_steps = sum(len(p) for p in plans)
    earlier_steps = sum(s["steps"] for s in session.run.manifest["stages"] if s["index"] < runner.task_index)
    checkpoints = session.run.in_progress_dir(runner.task_index) / checkpoint.CHECKPOINT_DIR
    resumable = dist_utils.run_on_main(checkpoint.newest_complete, checkpoints, checkpoint.layout(recipe))
    log: list[dict[str, Any]] = []
    if resumable is not None:
        checkpoint.load(engine, resumable)
        log = resumable.log
        session.console.print(f"resuming {task} after step {resumable.step}/{total_steps} ({resumable.tag})")
    # the data order is a function of seed and epoch: the steps done say where to go on
    micro_batches = [
        (e, indices, weight)
        for e, plan in enumerate(plans) for step in plan
        for indices, weight in rank_share(list(zip(step, token_weights(train_rows, step), strict=True)), world, rank)
    ][len(log) * accumulation:]
    every = recipe.train.checkpoint_every_steps
    engine.train()
    dist_utils.restart_zero_trace(engine)
    sums: dict[str, torch.Tensor] = {}  # detached device tensors: no host sync per micro-batch
    tokens = torch.zeros((), dtype=torch.float64, device=dist_utils.accelerator_device())
    started = time.perf_counter()
    label = f"{_stage_label(session, runner.task_index)} step"
    live_log = session.run.in_progress_dir(runner.task_index) / TRAIN_LOG
    with session.reporter.bar(label, total_steps, every=recipe.train.log_every, done=len(log)) as bar, (
        LiveStepLog(live_log, log) if dist_utils.is_main() else contextlib.nullcontext()
    ) as live:
        for epoch, indices, weight in micro_batches:
            batch = train_rows.batch(indices)
            output = engine(**batch)
            loss, terms = session.method.loss(output.loss * weight, session.model.context)
            engine.backward(loss)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value.detach().double()
            tokens += batch["attention_mask"].sum()
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                session.method.before_step(runner)
            engine.step()
            if not boundary:
                continue
            session.method.after_step(runner)
            record, stopping = step_record(
                engine, sums, accumulation, tokens, started, epoch, len(log) + 1, stop_requested=stop.received
            )
            log.append(record)
            if live is not None:
                live.append(record)
            if session.tracker is not None:
                session.tracker.log_step(record, earlier_steps + record["step"])
            sums, started = {}, time.perf_counter()
            tokens = torch.zeros_like(tokens)
            bar.update(len(log), _progress_fields(record, session, runner.task_index, bar))
            if stopping or (every and len(log) % every == 0 and len(log) < total_steps):
                checkpoint.save(engine, checkpoints, len(log), log, recipe)
            if stopping:
                session.console.print(f"stopped by a signal after step {len(log)}/{total_steps} of {task}: "
                                      f"checkpoint written, --resume goes on from there")
                raise StopRequested
    if every and (resumable is None or resumable.step < len(log)):
        checkpoint.save(engine, checkpoints, len(log), log, recipe)
    return log


def token_weights(rows: TaskRows, step: list[list[int]]) -> list[float]:
    """Per micro-batch of `step`, the factor that turns its mean loss into its part of the mean over every
    loss token of the step, as DeepSpeed averages micro-batches (over accumulation steps and ranks: hence
    times their count). So a step's loss does not depend on how its global batch is split into micro-
    batches and ranks, every token weighs the same, and per_device_batch is only a memory knob."""
    counts = [rows.loss_tokens(micro) for micro in step]
    total = sum(counts)
    if total == 0:
        raise CLScaleError(
            "a global batch of the task has no answer tokens to train on (every answer truncated away?)",
            "raise data.max_target_length, or check the task's targets with cl-scale data check",
        )
    return [count * len(step) / total for count in counts]


def _progress_fields(record: dict[str, Any], session: Session, index: int, bar: Bar) -> dict[str, Any]:
    """A step record as progress shows it: every loss term, lr, grad norm, tokens/s, the run's ETA."""
    shown = {k: v for k, v in record.items() if k not in ("step", "epoch", "tokens_per_s")}
    shown["tokens/s"] = round(record["tokens_per_s"])
    remaining = None if bar.done == 0 else _run_remaining_s(session, index, bar)
    shown["run eta"] = None if remaining is None else format_duration(remaining)
    return shown


def _snapshot(session: Session) -> dict[str, torch.Tensor]:
    """Full values of every branch and gate parameter as the model computes with them. Collective."""
    params = session.model.branch_parameters()
    names = sorted(params)
    values = ZeroAccess().read_working([params[n] for n in names])
    return {n: v.contiguous() for n, v in zip(names, values)}


def _evaluate_stage(
    session: Session, engine: DeepSpeedEngine, index: int, between_cells: Callable[[], None]
) -> dict[str, TaskResult]:
    if index not in session.recipe.eval.evaluated_stages(len(session.tasks)):
        return {}
    results = {}
    seen = session.tasks[: index + 1]
    with session.reporter.bar(f"{_stage_label(session, index)} eval cell", len(seen)) as bar:
        for done, task in enumerate(seen, start=1):
            results[task] = evaluate_task(
                engine, session.recipe, session.state.tokenizer, session.state.kind, task, cache_dir=session.cache_dir
            )
            session.console.print(f"  eval {task}: {results[task].metric} {results[task].score:.2f}")
            bar.update(done)
            between_cells()
    return results


def _commit_stage(
    session: Session, index: int, outcome: StageOutcome, memory: list[float] | None
) -> dict[str, Any]:
    """Rank 0: write stage `index` atomically and record it (parameter counts, steps, RSS per rank in MiB).

    Returns the updated manifest, which every rank then holds (one source of truth: rank 0's).
    """
    from safetensors.torch import save_file

    method_state = {k: v.detach().cpu().contiguous() for k, v in session.method.state_tensors().items()}

    def write(folder: Path) -> None:
        atomic.write_with(folder / SNAPSHOT, lambda p: save_file(outcome.snapshot, str(p)))
        atomic.write_with(folder / METHOD_STATE, lambda p: save_file(method_state, str(p)))
        atomic.write_jsonl(folder / TRAIN_LOG, outcome.log)
        write_stage_results(folder, outcome.results)

    record = {
        "parameters": outcome.counts,
        "steps": len(outcome.log),
        "rss_mb": memory,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    session.run.commit_stage(index, write, record)
    in_progress = session.run.in_progress_dir(index)
    shutil.rmtree(in_progress, ignore_errors=True)  # the stage folder has it all now
    with contextlib.suppress(OSError):
        in_progress.parent.rmdir()  # once no stage is in progress
    return session.run.manifest


def _print_matrix(session: Session) -> None:
    """Rank 0: the matrix so far as a table, and its files when the newest row is complete."""
    if not dist_utils.is_main():
        return
    seen = len(session.run.finished_stages())
    matrix = run_matrix(session.run, seen)
    try:
        metrics = compute_metrics(matrix)
    except CLScaleError:
        return
    session.console.print(matrix_table(matrix, session.tasks[:seen], metrics))
    write_matrix_files(session.run.path, matrix, session.tasks[:seen], metrics)


def _final_report(session: Session) -> None:
    session.console.rule("[bold]done")
    session.console.print(f"run directory: {session.run.path}")
