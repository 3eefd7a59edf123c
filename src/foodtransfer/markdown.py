"""The text of the reports (``reports/comparison.md``, ``reports/experiments.md``): numbers with
their intervals, tables, and plain sentences about differences between variants."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from foodtransfer.tracking.registry import CHAMPION_ALIAS
from foodtransfer.uncertainty import MIN_SEEDS, SIGNIFICANCE, PairedDifference, holm_adjusted

MINUS = "\u2212"


def number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_interval(metrics: dict[str, Any], key: str) -> str:
    """``0.853 [0.818, 0.886]``: a metric and its ``_ci_low`` / ``_ci_high`` where known."""
    value = number(metrics.get(key))
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return value if low is None or high is None else f"{value} [{low:.3f}, {high:.3f}]"


def count(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def cell(value: Any, limit: int | None = None) -> str:
    text = str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]],
          numeric: Sequence[bool] | None = None) -> list[str]:
    """Markdown table lines; ``numeric`` columns are right-aligned."""
    numeric = numeric or [False] * len(header)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(" ---: " if right else " --- " for right in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def points(value: float, signed: bool = True) -> str:
    """A difference in accuracy, in percentage points: ``+1.0``, ``−0.9``."""
    text = f"{abs(value) * 100:.1f}"
    if not signed:
        return text
    return (MINUS if value < 0 else "+") + text


def verdict(difference: PairedDifference) -> str:
    return (f"{'significant' if difference.significant else 'not significant'} at the "
            f"{SIGNIFICANCE:g} level")


def difference_text(difference: PairedDifference) -> str:
    """``+1.0 points [−0.9, +2.9], McNemar p = 0.31``."""
    return (f"{points(difference.difference)} points [{points(difference.ci_low)}, "
            f"{points(difference.ci_high)}], McNemar p {p_relation(difference.p_value)}")


def difference_sentence(a: str, b: str, difference: PairedDifference) -> str:
    """``finetune vs dropout: +1.0 points [−0.9, +2.9], McNemar p = 0.31: not significant at
    the 0.05 level``."""
    return f"{a} vs {b}: {difference_text(difference)}: {verdict(difference)}"


def p_value(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}" if value < 0.01 else f"{value:.2f}"


def p_relation(value: float) -> str:
    """``= 0.31`` or ``< 0.001``."""
    text = p_value(value)
    return text if text.startswith("<") else f"= {text}"


@dataclass(frozen=True)
class Pair:
    """Variant ``a`` against variant ``b`` on the same test (and validation) images."""

    a: str
    b: str
    test: PairedDifference
    validation: PairedDifference | None = None


@dataclass(frozen=True)
class ReportContext:
    """Where the report's numbers come from, for its header."""

    experiment: str
    data_version: str
    parent_run_id: str | None = None
    git_commit: str | None = None
    dvc_exp_name: str | None = None
    registered_model: str | None = None  # the candidates model the winner is registered in
    production_model: str | None = None  # the model whose @champion predict and serve use
    registered_version: str | None = None
    registered_alias: str = CHAMPION_ALIAS  # champion: promoted; challenger: not
    run_owner: dict[str, str] | None = None  # variant -> pipeline run that trained it
    keep_epoch: str | None = None  # the rule that chose each variant's kept epoch


def _champion_lines(results: dict[str, Any], champion: str, runner_up: Pair | None,
                    context: ReportContext) -> list[str]:
    best = results[champion].metrics
    line = (f"**Champion: {champion}** (validation accuracy {best['best_val_accuracy']:.3f}; "
            "chosen on validation, never on test)")
    if context.registered_model:
        line += (f", registered as version {context.registered_version} of "
                 f"`{context.registered_model}`")
        production = context.production_model or context.registered_model
        if context.registered_alias == CHAMPION_ALIAS:
            line += (f" and promoted: `@{CHAMPION_ALIAS}` of `{production}` now points at a "
                     f"copy of it, `models:/{production}@{CHAMPION_ALIAS}`")
        else:
            line += (f" with the alias `@{context.registered_alias}`, "
                     f"`models:/{context.registered_model}@{context.registered_alias}`; "
                     f"`@{CHAMPION_ALIAS}` of `{production}` did not move (`foodtransfer "
                     f"promote {context.registered_version}` moves it)")
    lines = [line + "."]
    if runner_up is not None:
        parts = [f"on {where} {difference_text(diff)}"
                 for where, diff in (("validation", runner_up.validation),
                                     ("test", runner_up.test)) if diff is not None]
        better = [where for where, diff in (("validation", runner_up.validation),
                                            ("test", runner_up.test))
                  if diff is not None and diff.significant and diff.difference > 0]
        summary = (f"significantly better than the runner-up {runner_up.b} on "
                   f"{' and '.join(better)}" if better else
                   f"not significantly better than the runner-up {runner_up.b}")
        lines += ["", f"The champion is {summary}: " + "; ".join(parts) + "."]
    return lines


def comparison_markdown(results: dict[str, Any], champion: str,
                        changed: dict[str, tuple[Any, Any]], context: ReportContext,
                        pairs: Sequence[Pair] = (), runner_up: Pair | None = None) -> str:
    """``comparison.md``: the variants of one pipeline execution side by side, with 95 %
    intervals, paired tests between them, the champion, and the params that were changed."""
    lines = ["# Food-101 transfer learning: comparison of the variants", ""]
    facts = [f"data version `{context.data_version}`",
             f"MLflow experiment `{context.experiment}`"]
    if context.parent_run_id:
        facts.append(f"pipeline run `{context.parent_run_id}`")
    if context.dvc_exp_name:
        facts.append(f"DVC experiment `{context.dvc_exp_name}`")
    if context.git_commit:
        facts.append(f"git commit `{context.git_commit[:12]}`")
    lines += [" · ".join(facts), ""]
    lines += _champion_lines(results, champion, runner_up, context) + [""]
    rows = []
    for name, result in results.items():
        metrics = result.metrics
        run = f"`{result.run_id}`"
        owner = (context.run_owner or {}).get(name)
        if owner and owner != context.parent_run_id:
            run += f" (reused from pipeline run `{owner}`)"
        rows.append([
            f"**{name}**" if name == champion else name,
            with_interval(metrics, "test_accuracy"), with_interval(metrics, "test_top5_accuracy"),
            with_interval(metrics, "test_macro_f1"), number(metrics.get("best_val_accuracy")),
            number(metrics.get("epochs_run")), number(metrics.get("best_epoch")),
            number(metrics.get("seconds_per_epoch"), 2),
            f"{count(metrics.get('trainable_params'))} / {count(metrics.get('total_params'))}",
            run])
    lines += table(("variant", "test accuracy [95 % CI]", "test top-5 [95 % CI]",
                    "test macro F1 [95 % CI]", "validation accuracy", "epochs", "kept epoch",
                    "s / epoch", "trainable / total params", "MLflow run"), rows,
                   [False] + [True] * 8 + [False])
    chance = results.get("baseline") and results["baseline"].metrics.get(
        "untrained_test_accuracy")
    classes = results[champion].class_names
    lines += ["", "Intervals: 95 % percentile bootstrap over the test images (2000 resamples). "
              f"{len(classes)} classes; chance level is about {1 / len(classes):.3f}"
              + (f" (the untrained baseline scores {chance:.3f} on test)." if chance is not None
                 else "."), ""]
    if context.keep_epoch:
        from foodtransfer.training.hyperrule import KEEP_WHY

        lines += [f"Kept epoch: each variant keeps the weights of the epoch with "
                  f"{KEEP_WHY[context.keep_epoch]} (`keep_epoch={context.keep_epoch}`), chosen "
                  "on validation only; early stopping follows the same rule.", ""]
    if pairs:
        lines += ["## Which differences hold", "",
                  "Each pair on the same test images: the accuracy difference with a paired "
                  "bootstrap 95 % interval, and an exact McNemar test on the images exactly one "
                  f"of the two gets right. \"significant\" is at the {SIGNIFICANCE:g} level "
                  f"after Holm's correction for the {len(pairs)} comparisons (the Holm p "
                  "column); the raw p of each test stands beside it.", ""]
        pair_rows = []
        holm = holm_adjusted([pair.test.p_value for pair in pairs])
        for pair, adjusted in zip(pairs, holm):
            diff = pair.test
            row = [f"{pair.a} vs {pair.b}", f"{points(diff.difference)}",
                   f"[{points(diff.ci_low)}, {points(diff.ci_high)}]",
                   f"{diff.only_a_right} / {diff.only_b_right}", p_value(diff.p_value),
                   p_value(adjusted), "yes" if adjusted < SIGNIFICANCE else "no"]
            val = pair.validation
            row += ([f"{points(val.difference)}", p_value(val.p_value)] if val is not None
                    else ["-", "-"])
            pair_rows.append(row)
        lines += table(("pair (a vs b)", "test difference (points)", "95 % CI",
                        "only a right / only b right", "McNemar p", "Holm p",
                        "significant (Holm)", "validation difference", "validation p"),
                       pair_rows, [False, True, True, True, True, True, False, True, True])
        lines += [""] + [f"- {difference_sentence(pair.a, pair.b, pair.test)}."
                         for pair in pairs] + [""]
    lines += ["## Params that differ from the defaults", ""]
    if changed:
        lines += table(("param", "value", "default"),
                       [[f"`{key}`", cell(value), cell(default, 60)]
                        for key, (value, default) in sorted(changed.items())])
    else:
        lines.append("None: every param has its default value.")
    lines += ["", "## Figures", "",
              "Learning curves (train dashed, validation solid; stars mark the best epochs):", "",
              "![learning curves](curves.png)", "",
              "Test confusion matrices:", "", "![confusion matrices](confusion.png)", "",
              f"The champion's ({champion}) most confident test mistakes:", "",
              "![most confident mistakes](errors.png)", ""]
    return "\n".join(lines)


def experiments_markdown(experiment: str, executions: Sequence[Any], groups: Sequence[Any],
                         swept: list[str], summaries: Sequence[Any],
                         unfinished: Sequence[Any], comparison_run_id: str | None,
                         differences: Sequence[Any] = ()) -> str:
    """``experiments.md``: what `foodtransfer compare` found (its executions, configurations,
    per-variant summaries, differences between configurations and unfinished runs, see
    :mod:`foodtransfer.compare`)."""
    versions = sorted({e.data_version for e in executions})
    lines = ["# Food-101 transfer learning: experiments compared", "",
             f"MLflow experiment `{experiment}` · data version `{', '.join(versions)}` · "
             f"{len(executions)} pipeline runs in {len(groups)} configuration"
             f"{'s' * (len(groups) != 1)}"
             + (f" · comparison run `{comparison_run_id}`" if comparison_run_id else ""), ""]
    if swept:
        lines += [f"The configurations differ in {', '.join(f'`{s}`' for s in swept)}"
                  " (see experiments.png); within one, the runs differ only in `seed`.", ""]
    lines += ["Mean ± standard deviation over seeds. Two 95 % bootstrap intervals of the "
              "seed-averaged test accuracy: **seeds + images** answers \"what will this "
              "configuration score when trained again and tested on other images\" (a "
              "two-level bootstrap: the seeds, then the test images); **images only** holds "
              "these seeds fixed and resamples the test images (each with every seed's "
              f"answer). The seed level needs at least {MIN_SEEDS} seeds: with fewer, the "
              "seed share cannot be estimated (`n/a`).", ""]
    rows = [[summary.group.label(swept), summary.variant, str(len(summary.seeds)),
             summary.mean_sd_text("test_accuracy"),
             (f"[{summary.both[0]:.3f}, {summary.both[1]:.3f}]" if summary.both
              else f"n/a (< {MIN_SEEDS} seeds)" if summary.pooled else "-"),
             (f"[{summary.pooled[0]:.3f}, {summary.pooled[1]:.3f}]" if summary.pooled
              else "-"),
             summary.mean_sd_text("test_macro_f1"),
             summary.mean_sd_text("best_val_accuracy")] for summary in summaries]
    lines += table(("configuration", "variant", "seeds", "test accuracy",
                    "seeds + images 95 % CI", "images only 95 % CI", "test macro F1",
                    "validation accuracy"), rows,
                   [False, False, True, True, True, True, True, True])
    lines += ["", "## Where the uncertainty comes from", "",
              "The sd of test accuracy over seeds (training) beside the sd of the "
              "seed-averaged accuracy when only the test images are resampled (test set).", ""]
    shares = []
    for summary in summaries:
        seed_sd = summary.mean_sd("test_accuracy")[1]
        more = summary.narrower_by()
        shares.append([summary.group.label(swept), summary.variant,
                       number(seed_sd), number(summary.image_sd),
                       (f"more {more}" if more else f"n/a (< {MIN_SEEDS} seeds)")])
    lines += table(("configuration", "variant", "sd over seeds", "sd from test images",
                    "narrows the interval most"), shares, [False, False, True, True, False])
    if len(groups) > 1 and not differences:
        lines += ["", "## Differences between configurations", "",
                  f"Not computed: they need at least {MIN_SEEDS} seeds of each configuration "
                  "on the same test images (`make seeds SEEDS=1,2,3`)."]
    if differences:
        reference = differences[0].reference.label(swept)
        lines += ["", "## Differences between configurations", "",
                  f"Test accuracy of each configuration minus the reference ({reference}; "
                  "`--against` chooses another), per variant, on the same test images: a "
                  "two-level bootstrap (each configuration's seeds, then the shared images) "
                  "gives the 95 % interval and a two-sided p-value; Holm adjusts the p-values "
                  "across all the comparisons below.", ""]
        lines += table(
            ("configuration", "variant", "seeds", "difference", "95 % CI", "p", "Holm p",
             "significant"),
            [[d.group.label(swept), d.variant, f"{d.result.seeds_a} vs {d.result.seeds_b}",
              f"{points(d.result.difference)} points",
              f"[{points(d.result.ci_low)}, {points(d.result.ci_high)}]",
              p_value(d.result.p_value), p_value(d.holm_p),
              "yes" if d.holm_p < SIGNIFICANCE else "no"] for d in differences],
            [False, False, True, True, True, True, True, False])
    lines += ["", "## Runs compared", ""]
    lines += table(
        ("pipeline run", "DVC experiment", "seed", "configuration"),
        [[f"`{e.run_id}`", e.tags.get("dvc_exp_name", "-"), e.seed,
          next(g.label(swept) for g in groups if e in g.executions)] for e in executions])
    if unfinished:
        lines += ["", "## Not included", "", "Failed or still running: never averaged.", ""]
        lines += table(("experiment or run", "status", "runs"),
                       [[u.name, u.status, u.detail] for u in unfinished])
    if swept:
        lines += ["", "![the metric against the swept params](experiments.png)"]
    return "\n".join(lines) + "\n"
