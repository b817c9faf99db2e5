"""Which runs each study is made of: names that say what differs, settings that match them."""

from __future__ import annotations

from benchmarks.study.runner import slug
from benchmarks.study.studies import StudyOptions, partitions, remedies, stragglers


def test_straggler_and_partition_studies_weigh_fedbuff_updates_by_size_unless_asked() -> None:
    for study in (stragglers, partitions):
        fedbuff_runs = [r for r in study(StudyOptions()) if r.name.startswith("FedBuff")]
        assert fedbuff_runs and all(r.strategy and r.strategy.sample_weighted for r in fedbuff_runs)
        assert not any("uniform" in r.name for r in fedbuff_runs)


def test_uniform_weights_reach_every_fedbuff_run_and_its_name_only() -> None:
    # Given the option the remedies study adopted
    options = StudyOptions(uniform_weights=True)
    for study in (stragglers, partitions):
        runs = study(options)
        for run in runs:
            assert run.strategy is not None
            is_fedbuff = run.strategy.name == "fedbuff"
            # Then FedBuff weighs alike and says so; FedAsync and FedAvg keep their weighting
            assert run.strategy.sample_weighted is not is_fedbuff
            assert ("uniform weights" in run.name) is is_fedbuff
    assert [slug(r.name) for r in partitions(options)] == [
        "fedbuff-k-4-uniform-weights-iid",
        "fedbuff-k-4-uniform-weights-dirichlet-0.5",
        "fedbuff-k-4-uniform-weights-dirichlet-0.1",
    ]


def test_every_remedy_has_a_distinct_name_usable_with_only() -> None:
    names = [r.name for r in remedies(StudyOptions())]
    assert len({slug(n) for n in names}) == len(names)
