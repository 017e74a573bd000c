"""The search algorithm for replicate seeds: Ray Tune's ``Repeater``, also for several objectives.

``Repeater(searcher, repeat=len(sweep.seeds))`` runs each configuration the searcher proposes
``repeat`` times, puts the replicate's index into the trial config (``__trial_index__``, which
the trial driver turns into the run's seed: :mod:`orchestrator.replicates`) and tells the
searcher the replicates' mean once all of them have ended. Its state (the groups of replicates)
is saved with the Tuner's experiment state, so ``--resume`` keeps the groups.

Ray's ``Repeater`` reads one metric; :class:`ReplicateSearcher` averages each objective of a
multi-objective search (``sweep.extra_objectives``) and reports a configuration whose replicates
all ended without a finite value as failed (not as a NaN Optuna would refuse with a warning).
Its own module because it imports Ray Tune at import time, which the dry run need not pay for.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search import Repeater


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ReplicateSearcher(Repeater):
    """``Repeater`` over a single- or multi-objective searcher (``searcher.metric`` a name or a list)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs) -> None:
        group = self._trial_id_to_group.get(trial_id)
        if group is None:  # not one of ours (Repeater would log and raise a KeyError)
            return
        metrics = self.searcher.metric if isinstance(self.searcher.metric, list) else [self.searcher.metric]
        values = tuple(float(result[m]) if result and _finite(result.get(m)) else math.nan for m in metrics)
        group.report(trial_id, values)
        if not group.finished_reporting():
            return
        means = []
        for i in range(len(metrics)):
            column = [scores[i] for scores in group.scores() if not math.isnan(scores[i])]
            means.append(sum(column) / len(column) if column else math.nan)
        if any(math.isnan(m) for m in means):  # every replicate failed (or ended without the metric)
            self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=True)
            return
        self.searcher.on_trial_complete(group.primary_trial_id, result=dict(zip(metrics, means)))


def replicate_searcher(searcher, repeat: int) -> ReplicateSearcher:
    """``searcher`` wrapped to run each configuration ``repeat`` times (``__trial_index__`` in the config)."""
    return ReplicateSearcher(searcher, repeat=repeat, set_index=True)
