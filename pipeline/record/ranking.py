"""Which run wins: the one ranking rule of sweep summaries, the parent's ``best.<key>``, compare and report.html.

Only keys that say how good a result is are ranked (:func:`is_ranked`: quality scores with a registered direction,
never timings, ``cost/*``, counts, interval bounds, progress figures or ``fd_floor``), only among finished runs, never
a key equal across them; several runs at the best value are a tie, named as such (issue 29).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from pipeline.core.escape import terminal_text
from pipeline.core.metric_keys import (
    CI_SUFFIXES,
    FID,
    FID_INF,
    INCEPTION,
    QUALITY_MODES,
    higher_is_better,
    is_cost,
    is_progress,
    is_quality,
    is_timing,
    metric_key,
)

EQUAL_REL_TOL = 1e-9  # values equal to 9 significant digits are one value (float32 sums in another order)
TIE_SEPARATOR = ","  # best.<key>.run_id of a tie at the top: every tied run id, joined (run ids hold no comma)
MAX_TIED_IDS = 100  # run ids listed in one tag (an MLflow tag holds 8000 characters); the rest are counted
VERDICTS = {
    "separable": "separable: the 95 % intervals are disjoint",
    "tie": "tie: the 95 % intervals overlap",
    "equal values": "tie: equal values",
    "no interval": "no interval: point estimates only",
}


def finite(value: Any) -> bool:
    """A real number (no bool), not NaN or infinite: a value that can be ranked or plotted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_ranked(key: str) -> bool:
    """Whether runs are ranked by result ``key``: a quality metric (:func:`pipeline.core.metric_keys.is_quality`: a
    ``metrics/*`` or ``schedule/*`` score with a registered direction, preference scores included; never a timing,
    ``cost/*``, count, interval bound, progress figure or ``fd_floor``), or another mode's score with a registered
    direction under the same exclusions (``attention/miou``, ``latent/recon_psnr``).

        >>> [is_ranked(k) for k in ("metrics/fd_clip", "metrics/pickscore", "attention/miou", "metrics/fd_floor_clip",
        ...                         "metrics/sec_per_image", "cost/flops_per_image", "cost/sec_per_image")]
        [True, True, True, False, False, False, False]
    """
    if key.startswith(QUALITY_MODES):
        return is_quality(key)
    if is_cost(key) or is_timing(key) or is_progress(key) or key.endswith(CI_SUFFIXES):
        return False
    return higher_is_better(key) is not None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=EQUAL_REL_TOL, abs_tol=0.0)


@dataclass
class Ranking:
    """The finished runs' order on one :func:`is_ranked` key: the rows at the best value (several: a tie at the top),
    the rows at the next value, and the verdict, a key of :data:`VERDICTS`: ``equal values`` (several runs share the
    best value), ``separable`` (the best's 95 % interval ``<key>_ci_low`` / ``_ci_high`` is disjoint from each
    runner-up's), ``tie`` (they overlap: the data do not say which is better) or ``no interval`` (a run lacks one:
    the order is only the point estimates')."""

    metric: str
    higher: bool
    best: list[dict[str, Any]]
    runner_up: list[dict[str, Any]]
    verdict: str

    @property
    def value(self) -> float:
        return self.best[0][self.metric]

    @property
    def runner_up_value(self) -> float:
        return self.runner_up[0][self.metric]


def rank(rows: list[dict[str, Any]], key: str) -> Optional[Ranking]:
    """``key``'s :class:`Ranking` over the finished ``rows`` (start order among equal values); None when ``key`` is
    not :func:`is_ranked`, fewer than two finished rows have it finite, or their values are all equal (nothing to
    rank: :func:`equal_keys`)."""
    if not is_ranked(key):
        return None
    have = [r for r in rows if r.get("status") == "FINISHED" and finite(r.get(key))]
    if len(have) < 2:
        return None
    higher = bool(higher_is_better(key))
    ordered = sorted(have, key=lambda r: -r[key] if higher else r[key])  # stable
    top = [r for r in have if _same(r[key], ordered[0][key])]  # each group in start order
    rest = [r for r in ordered if not _same(r[key], ordered[0][key])]
    if not rest:
        return None
    second = [r for r in have if _same(r[key], rest[0][key]) and not _same(r[key], ordered[0][key])]
    if len(top) > 1:
        verdict = "equal values"
    else:
        bounds = [(r.get(key + CI_SUFFIXES[0]), r.get(key + CI_SUFFIXES[1])) for r in (top[0], *second)]
        if not all(finite(low) and finite(high) for low, high in bounds):
            verdict = "no interval"
        else:
            (low, high), others = bounds[0], bounds[1:]
            apart = all((low > h) if higher else (high < lo) for lo, h in others)
            verdict = "separable" if apart else "tie"
    return Ranking(metric=key, higher=higher, best=top, runner_up=second, verdict=verdict)


def _ranked_keys(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows if r.get("status") == "FINISHED" for k in r if is_ranked(k)})


def rankings(rows: list[dict[str, Any]]) -> list[Ranking]:
    """:func:`rank` of every :func:`is_ranked` key of the finished rows that has one, by key."""
    return [r for r in (rank(rows, k) for k in _ranked_keys(rows)) if r is not None]


def equal_keys(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``{key: value}``: the :func:`is_ranked` keys that at least two finished rows have, all with one value (to
    :data:`EQUAL_REL_TOL`): not ranked, said once."""
    out = {}
    for key in _ranked_keys(rows):
        values = [r[key] for r in rows if r.get("status") == "FINISHED" and finite(r.get(key))]
        if len(values) >= 2 and all(_same(v, values[0]) for v in values):
            out[key] = values[0]
    return out


def _without_aliases(keys: Iterable[str]) -> list[str]:
    """``keys`` less ``metrics/fid`` (``fid_inf``) where ``metrics/fd_inception`` (``fd_inf_inception``) is there."""
    keys = list(keys)
    drop = {alias for alias, stat in ((FID, "fd"), (FID_INF, "fd_inf")) if metric_key(stat, INCEPTION) in keys}
    return [k for k in keys if k not in drop]


def join_run_ids(ids: list[str]) -> str:
    """The run ids at the best value as one tag value: one id, or a tie's ids joined by :data:`TIE_SEPARATOR`
    (at most :data:`MAX_TIED_IDS`, then ``… N more``)."""
    more = [f"… {len(ids) - MAX_TIED_IDS} more"] if len(ids) > MAX_TIED_IDS else []
    return TIE_SEPARATOR.join([*ids[:MAX_TIED_IDS], *more])


def best_label(run_ids: str, names: dict[str, Any]) -> str:
    """A ``best.<key>.run_id`` value (:func:`join_run_ids`) for a reader: the run's name (``names``: run id -> run
    name; an unknown id stays), or ``tie: a, b`` for a tie at the top.

        >>> best_label("r1", {"r1": "euler"}), best_label("r1,r2", {"r1": "euler", "r2": "ddim"})
        ('euler', 'tie: euler, ddim')
    """
    shown = [str(names.get(i) or i) for i in str(run_ids).split(TIE_SEPARATOR)]
    return shown[0] if len(shown) == 1 else "tie: " + ", ".join(shown)


def best_runs(children: list[Any]) -> dict[str, tuple[float, str]]:
    """``{result key: (best value, run ids)}`` over the finished runs (MLflow run objects), for every key
    :func:`rank` ranks: :func:`is_ranked` keys (no timing, ``cost/*``, count, bound or ``fd_floor``) whose values
    differ between at least two finished runs. ``run ids``: the run at the best value, or a tie's runs joined
    (:func:`join_run_ids`; read with :func:`best_label`). The sweep parent logs them as ``best.<key>`` and the tag
    ``best.<key>.run_id``."""
    rows = [
        {
            "run_id": run.info.run_id,
            "run_name": getattr(run.info, "run_name", None),
            "status": run.info.status,
            **{k: v for k, v in run.data.metrics.items() if not is_progress(k)},
        }
        for run in sorted(children, key=lambda r: r.info.start_time or 0)
    ]
    return {r.metric: (r.value, join_run_ids([str(x["run_id"]) for x in r.best])) for r in rankings(rows)}


def _name(row: dict[str, Any]) -> str:
    return str(row.get("run_name") or row.get("run_id") or "?")


def winners(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per :func:`rankings` key (``metrics/fid`` left out where it repeats ``metrics/fd_inception``): ``best`` and
    ``runner_up`` (run names, ``, ``-joined where several share the value; ``best_runs`` / ``runner_up_runs`` the
    lists), their values and the :class:`Ranking` verdict. Timings, ``cost/*``, counts, bounds, ``fd_floor`` and keys
    equal across the finished runs are never ranked."""
    by_key = {r.metric: r for r in rankings(rows)}
    out = []
    for key in _without_aliases(by_key):
        r = by_key[key]
        best, second = [_name(x) for x in r.best], [_name(x) for x in r.runner_up]
        out.append(
            {
                "metric": key,
                "best": ", ".join(best),
                "best_runs": best,
                "best_value": r.value,
                "runner_up": ", ".join(second),
                "runner_up_runs": second,
                "runner_up_value": r.runner_up_value,
                "verdict": r.verdict,
            }
        )
    return out


def winner_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``which run wins`` lines for :func:`winners` (printed by ``pipeline.record.compare`` and the sweep summary;
    run names made safe for a terminal), then one line naming the keys equal across the finished runs
    (:func:`equal_keys`), which are not ranked."""
    lines = [
        f"  {w['metric']}: best {terminal_text(w['best'])} ({w['best_value']:.4g}), runner-up "
        f"{terminal_text(w['runner_up'])} ({w['runner_up_value']:.4g}) — {VERDICTS[w['verdict']]}"
        for w in winners(rows)
    ]
    equal = equal_keys(rows)
    if equal:
        same = ", ".join(f"{k} ({equal[k]:.4g})" for k in _without_aliases(equal))
        lines.append(f"  equal across jobs, not ranked: {same}")
    return lines
