"""Public entry points: :func:`sparsify` (the whole pipeline) and :func:`inspect` (site table).

Pipeline: capture → discover → (gradients, for MOONSHOT) → calibrate → prune → apply. Nothing is
written into the model until every site has been pruned and checked, so a failure leaves the
model's weights untouched.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
import warnings
from typing import Any, Iterable, Sequence

import torch.nn as nn

from . import distributed
from .alpha_search import choose_alpha
from .config import SparsifyConfig, default_sequential_unit
from .fisher_pass import FisherStatistics, fisher_loss, gradient_pass, needs_gradients
from .errors import CalibrationError, ConfigError, NoPrunableSitesError, PatternError, PatternWarning
from .masks import check_pattern
from .passes.apply import WeightJournal, write_weights
from .passes.calibrate import LossFn, collect_hessians, group_sites, needs_diagonal_only
from .passes.capture import CapturedGraph, batch_shape_key, capture, iter_batches, normalize_batch
from .passes.discover import Site, dense_reasons, find_sites, select_sites
from .passes.meta import check_not_meta
from .passes.norm_recalibration import batchnorm_modules, recalibrate_batchnorm
from .passes.prune import NoStats, SiteResult, prune_all_groups, prune_group, to_matrix
from .passes.sequential import sequential_prune
from .passes.unsupported import unsupported_weights
from .progress import progress_bar
from .report import SiteReport, SparsityReport, layout_name

log = logging.getLogger(__name__)

#: sequential mode is chosen automatically for models with at least this many sites
AUTO_SEQUENTIAL_SITES = 8


def _prepare(model: nn.Module, example_inputs: Any, batches: list[Any], *,
             one_shape_only: bool = False) -> tuple[CapturedGraph, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Trace the model and normalise the batches. ``one_shape_only``: nothing but the given
    batches will run on the graph, so when they all share the example's shape a static export
    (faster to trace) is tried first."""
    norm = [normalize_batch(b, model) for b in batches]
    if example_inputs is not None:
        args, kwargs = normalize_batch(example_inputs, model)
    elif norm:
        args, kwargs = norm[0]
    else:
        raise CalibrationError("give example_inputs or calibration batches: the model must be run to be traced.")
    key = batch_shape_key(args, kwargs)
    static_first = one_shape_only and all(batch_shape_key(a, k) == key for a, k in norm)
    captured = capture(model, args, kwargs, static_first=static_first)
    if norm and not all(captured.matches(a, k) for a, k in norm):
        captured = capture(model, *norm[0])  # static graph: trace again at the calibration shape
        if not all(captured.matches(a, k) for a, k in norm):
            raise CalibrationError(
                "the model traced only with static shapes and calibration batches differ in shape; "
                "give calibration batches of one shape (e.g. fixed-length token windows).")
    return captured, norm


def inspect(model: nn.Module, example_inputs: Any, config: SparsifyConfig | None = None, *, prune_head: bool = False) -> list[dict[str, Any]]:
    """Table of every candidate weight: name, kind, shape, params, shared-input group, whether
    the given (or default) config selects it, and for every weight it leaves dense the reason
    (``reason``: skipped by discovery, excluded by which glob, the model's head)."""
    cfg = config or SparsifyConfig()
    check_not_meta(model, [example_inputs])
    args, kwargs = normalize_batch(example_inputs, model)
    captured = capture(model, args, kwargs)
    sites = find_sites(captured.gm, model)
    reasons = dense_reasons(sites, cfg, prune_head=prune_head)  # inspect reports, it does not refuse
    return [{**s.row(), "selected": s.name not in reasons, "reason": reasons.get(s.name, "")} for s in sites]


#: marks the report.skipped reasons of weights whose input size does not fit the N:M pattern
NM_SKIP_MARK = "needs the input size"


def _validate_patterns(sites: Sequence[Site], cfg: SparsifyConfig) -> tuple[list[Site], dict[str, str]]:
    """Split ``sites`` into those the pattern fits and ``{name: reason}`` for those it does not
    (input size not a multiple of M). With ``cfg.strict``, or when an ``overrides`` glob set the
    pattern (the layer was named on purpose), a misfit raises :class:`PatternError` instead."""
    keep: list[Site] = []
    dense: dict[str, str] = {}
    for s in sites:
        pat = cfg.pattern_for(s.name)
        cols = s.matrix_shape[1]
        if not (pat.is_nm and cols % pat.m):
            keep.append(s)
            continue
        overridden = any(fnmatch.fnmatchcase(s.name, g) for g in cfg.overrides)
        if cfg.strict or overridden:
            why = "overrides asks for it" if overridden else "strict=True"
            raise PatternError(
                f"{pat} sparsity needs in_features divisible by {pat.m}, but {s.name} has {cols} inputs ({why}); "
                f"exclude it (exclude=[..., '{s.name}']) or give it an unstructured override "
                f"(overrides={{'{s.name}': 0.5}})" + ("" if overridden else "; with strict=False it is kept dense") + ".")
        dense[s.name] = f"{pat} {NM_SKIP_MARK} ({cols}) to be a multiple of {pat.m}"
    return keep, dense


def sparsify(
    model: nn.Module,
    example_inputs: Any = None,
    calibration: Iterable[Any] | None = None,
    sparsity: Any = 0.5,
    method: str = "sparsegpt",
    *,
    config: SparsifyConfig | None = None,
    loss_fn: LossFn | None = None,
    prune_head: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
    gradients: FisherStatistics | None = None,
    **options: Any,
) -> nn.Module:
    """Prune ``model`` in place, one shot, and return it (same object and class).

    Args:
        model: any ``nn.Module`` that torch.export (or fx.symbolic_trace) can trace.
        example_inputs: one batch used for tracing; defaults to the first calibration batch.
        calibration: iterable of batches — a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (HF style). Not needed for ``method="magnitude"``.
        sparsity: fraction in [0, 1) or ``"N:M"`` (e.g. ``"2:4"``).
        method: ``magnitude``, ``wanda``, ``sparsegpt``, ``optima``, ``admm`` or ``moonshot``.
        config: a full :class:`SparsifyConfig` (then ``sparsity``/``method``/``options`` are ignored).
        loss_fn: ``(output, args, kwargs) -> (batch,)`` per-sample losses for MOONSHOT's Fisher
            and ``alpha="auto"``; default (:func:`moonshot_fx.passes.losses.default_loss`):
            causal-LM next-token cross-entropy; seq2seq cross-entropy on ``labels`` (not
            shifted) or next-token on ``decoder_input_ids``; masked-LM cross-entropy on
            ``labels`` (``-100`` ignored); classifier cross-entropy on ``labels``; without
            labels, the dense model's own predictions. Other outputs raise :class:`LossError`.
        prune_head: also prune the final classifier / LM head when the globs allow it.
        max_batches: use at most this many calibration batches.
        progress: show tqdm progress bars.
        gradients: MOONSHOT's gradient statistics computed ahead (:func:`precompute_gradients`;
            :func:`moonshot_fx.sparsify_checkpoint` passes each layer's), used instead of this
            call's own backward pass; None (default) runs it.
        **options: any other :class:`SparsifyConfig` field (``base``, ``alpha``, ``include``,
            ``exclude``, ``overrides``, ``sequential``, ``dampening``, ``blocksize``, ``fisher`` …).
            ``exclude`` adds to the default exclusions (embeddings, heads; ``default_exclude=False``
            drops them). Weights whose input size does not fit an N:M pattern stay dense, listed
            in ``report.skipped`` with one :class:`PatternWarning` (``strict=True`` raises).
            ``recalibrate_norms`` (default None = auto) re-estimates BatchNorm statistics after
            pruning when the model has BatchNorm and calibration data is given; pass False to
            keep the dense statistics.

    Returns:
        ``model`` with pruned weights; ``model.moonshot_report`` holds a :class:`SparsityReport`.

    Raises:
        PatternError, ConfigError, TraceError, NoPrunableSitesError, CalibrationError (LossError),
        LinalgError, MetaDeviceError (weights or inputs on the meta device) — all
        :class:`MoonshotError`; the model's weights are unchanged when any is raised.

    ``report.skipped`` lists every weight left dense that discovery saw or the model holds with
    two or more dims (grouped convs, N:M misfits, recurrent layers, embeddings …) with the
    reason; weights excluded by the globs and final heads are not listed.
    """
    if config is None:
        unknown = set(options) - {f.name for f in dataclasses.fields(SparsifyConfig)}
        if unknown:
            raise ConfigError(f"unknown sparsify option(s) {sorted(unknown)}; valid options: "
                              f"{sorted(f.name for f in dataclasses.fields(SparsifyConfig))}")
    cfg = config or SparsifyConfig(sparsity=sparsity, method=method, **options)
    if config is not None and options:
        raise ConfigError(f"pass options inside config, not both: {sorted(options)}")
    cfg = cfg.replace(sequential_unit=default_sequential_unit(cfg))  # "auto" → what it means here
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    batches = list(iter_batches(calibration, max_batches))
    if distributed.is_distributed():
        batches = distributed.shard(batches)  # every rank gets the full list, keeps batches[rank::world]
    check_not_meta(model, [example_inputs, *batches])
    bn_auto = cfg.recalibrate_norms is None
    if bn_auto:  # auto: re-estimate BatchNorm statistics whenever there is calibration data for it
        cfg = cfg.replace(recalibrate_norms=bool(batches) and bool(batchnorm_modules(model)))
    if not batches and cfg.method != "magnitude":
        if example_inputs is None:
            raise CalibrationError(f"method {cfg.method!r} needs calibration data; pass calibration=[batch, ...].")
        warnings.warn("no calibration data given: calibrating on example_inputs only; pruning quality will suffer.",
                      stacklevel=2)
        batches = [example_inputs]
    was_training = model.training
    model.eval()
    journal = WeightJournal(model)
    try:
        # MOONSHOT's backward runs on micro-batches, which needs a graph with a dynamic batch size
        # (not when its gradients come precomputed)
        captured, norm = _prepare(model, example_inputs, batches, one_shape_only=cfg.method != "moonshot" or (
            gradients is not None and cfg.alpha != "auto"))
        timings["capture"] = time.perf_counter() - t0
        all_sites = find_sites(captured.gm, model)
        sites, misfits = _validate_patterns(select_sites(all_sites, cfg, prune_head=prune_head), cfg)
        if not sites:
            raise NoPrunableSitesError(
                f"every selected layer's input size misfits the pattern: {misfits}; use an unstructured "
                "sparsity (e.g. 0.5) or an N:M pattern whose M divides the input sizes.")
        if misfits:
            warnings.warn(f"keeping {len(misfits)} layer(s) dense, their input size does not fit the N:M pattern "
                          "(strict=True raises instead): " + "; ".join(f"{n}: {r}" for n, r in misfits.items()),
                          PatternWarning, stacklevel=2)
        sequential = cfg.sequential if cfg.sequential is not None else (
            len(sites) >= AUTO_SEQUENTIAL_SITES or cfg.reconstruct == "region")  # region refits need it
        skipped = dense_reasons(all_sites, cfg, prune_head=prune_head)
        skipped.update(misfits)
        skipped.update(unsupported_weights(model, all_sites))
        report = SparsityReport(config=cfg.to_dict(), skipped=skipped,
                                sequential=sequential and cfg.method != "magnitude", capture_method=captured.method,
                                norms_recalibrated_by_default=bn_auto and bool(cfg.recalibrate_norms))
        results = _run(model, captured, sites, norm, cfg, sequential, loss_fn, progress, timings, report, journal,
                       gradients)
        for name in [n for n, r in results.items() if r.skipped]:  # e.g. an unrouted expert kept dense
            report.skipped[name] = results.pop(name).skipped
        sites = [s for s in sites if s.name in results]
        for s in sites:
            r = results[s.name]
            if not check_pattern(to_matrix(s, r.weight), r.pattern):
                raise PatternError(f"internal error: {s.name} does not satisfy {r.pattern}; model left unchanged")
        written = set(journal.written)  # the sequential pass wrote its groups as it went
        pending = {name: r.weight for name, r in results.items() if name not in written}
        if written or cfg.recalibrate_norms:
            journal.write(pending)  # undoable: a later step may still fail
        else:
            write_weights(model, pending)  # validated before anything is written: all or nothing
        if cfg.recalibrate_norms:
            t = time.perf_counter()
            report.norms_recalibrated = recalibrate_batchnorm(model, norm)
            timings["recalibrate_norms"] = time.perf_counter() - t
    except BaseException:
        journal.rollback()  # all or nothing: every weight written so far is put back
        raise
    finally:
        journal.close()
        model.train(was_training)
    report.sites = [SiteReport(r.name, r.pattern, r.sparsity, r.rel_error, s.params, r.seconds, r.note,
                               layout=layout_name(s.transposed), solved_by=r.solved_by)
                    for s in sites for r in [results[s.name]]]
    timings["total"] = time.perf_counter() - t0
    report.timings = timings
    model.moonshot_report = report  # type: ignore[assignment]
    log.info("%s", report)
    return model


def block_alpha_search(cfg: SparsifyConfig, sequential: bool) -> bool:
    """Whether ``alpha="auto"`` is chosen per block inside the sequential pass
    (``cfg.alpha_search``, see :class:`SparsifyConfig`)."""
    if cfg.alpha_search == "model":
        return False
    possible = sequential and not distributed.is_distributed()
    if cfg.alpha_search == "block":
        if not possible:
            raise ConfigError("alpha_search='block' chooses alpha inside the sequential pass in one process: "
                              "use sequential=True (or None) without torchrun, or alpha_search='model'.")
        return True
    return possible and not cfg.recalibrate_norms


def precompute_gradients(model: nn.Module, calibration: Iterable[Any], config: SparsifyConfig, *,
                         loss_fn: LossFn | None = None, prune_head: bool = False) -> FisherStatistics | None:
    """MOONSHOT's gradient statistics of ``model``'s selected sites, as :func:`sparsify` with
    ``config`` would compute them, without pruning anything; None where the run needs none
    (another method, or α = 1). Pass the result as ``sparsify(..., gradients=...)`` with the same
    calibration batches (the per-row weights are per batch). ``loss_fn`` is used as given (a
    layer of a streamed model is scored by the gradient at its output, not by the model loss)."""
    if not needs_gradients(config):
        return None
    batches = list(calibration)
    was_training = model.training
    model.eval()
    try:
        captured, norm = _prepare(model, None, batches)
        sites, _ = _validate_patterns(select_sites(find_sites(captured.gm, model), config, prune_head=prune_head),
                                      config)
        return gradient_pass(captured, sites, norm, config, loss_fn)
    finally:
        model.train(was_training)


def _run(model: nn.Module, captured: CapturedGraph, sites: list[Site], norm: list[Any], cfg: SparsifyConfig,
         sequential: bool, loss_fn: LossFn | None, progress: bool, timings: dict[str, float],
         report: SparsityReport, journal: WeightJournal,
         gradients: FisherStatistics | None = None) -> dict[str, SiteResult]:
    """Gradients (MOONSHOT), alpha search, calibration and pruning; returns results. The
    sequential pass writes each group's weights through ``journal`` as it goes (so no copy of
    the pruned weights is held); the other paths write nothing."""
    if cfg.method == "magnitude":
        t = time.perf_counter()
        out = {r.name: r for g in group_sites(sites).values() for r in prune_group(g, NoStats(), model, cfg)}
        timings["prune"] = time.perf_counter() - t
        return out
    flat = [captured.flat_inputs(a, k) for a, k in norm]
    per_block = needs_gradients(cfg) and cfg.alpha == "auto" and block_alpha_search(cfg, sequential)
    row_weights = sample_fishers = None
    alpha: float | None = None
    if needs_gradients(cfg):
        t = time.perf_counter()
        if gradients is None:
            gradients = gradient_pass(captured, sites, norm, cfg, fisher_loss(cfg, loss_fn), progress)
        if gradients.fisher != cfg.fisher:
            cfg = cfg.replace(fisher=gradients.fisher)
            report.config["fisher"] = cfg.fisher
        if gradients.clusters:
            report.row_clusters = {k: v for k, v in gradients.clusters.items() if v > 1}
        row_weights, sample_fishers = gradients.row_weights, gradients.sample_fishers
        if cfg.fisher == "kron":
            report.kron_sites = [s.name for s in sites if s.slice_index is None and s.name in sample_fishers]
        timings["gradients"] = time.perf_counter() - t
        if per_block:
            report.config["alpha_search"] = "block"  # chosen per block inside the sequential pass
        elif cfg.alpha == "auto":
            report.config["alpha_search"] = "model"
            t = time.perf_counter()
            alpha, scores = choose_alpha(model, captured, sites, norm, cfg, row_weights, sample_fishers, loss_fn, progress)
            report.alpha_search = {f"{a:g}": v for a, v in scores.items()}
            timings["alpha_search"] = time.perf_counter() - t
        else:
            alpha = float(cfg.alpha)
        report.alpha = alpha
    t = time.perf_counter()
    if sequential:
        groups = group_sites(sites)
        bar = progress_bar(progress, "prune (sequential)", len(groups))(range(len(groups)))
        it = iter(bar)
        results = sequential_prune(captured, model, sites, flat, cfg, row_weights=row_weights,
                                   sample_fishers=sample_fishers, alpha=alpha, on_group=lambda _r: next(it, None),
                                   journal=journal, alpha_grid=cfg.alpha_grid if per_block else None,
                                   block_alphas=report.block_alphas)
        if per_block:
            report.config["sequential_unit"] = "block"  # the per-block search uses the block unit's statistics
        for _ in it:
            pass
    else:
        stats = collect_hessians(captured, sites, flat, row_weights=row_weights,
                                 diagonal_only=needs_diagonal_only(cfg),
                                 progress=progress_bar(progress, "calibrate", len(flat)))
        timings["calibrate"] = time.perf_counter() - t
        results = prune_all_groups(model, sites, stats, cfg, sample_fishers, alpha, progress)
    timings["prune"] = time.perf_counter() - t
    return results
