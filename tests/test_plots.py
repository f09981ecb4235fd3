"""The timing plot's legend must tell its series apart (issue 33, item 10)."""

from services.demo.plots import timing_figure

ROWS = [
    {"step": s, "time_wait_s": 1.0 + s, "time_train_s": 2.0, "time_checkpoint_s": 0.5, "staleness_mean": 0.5,
     "staleness_max": 1, "busy_rollout": 0.8, "busy_reward": 0.3}
    for s in range(1, 4)
]  # fmt: skip


def _styles(ax) -> list[tuple[str, str]]:
    return [(line.get_color(), line.get_linestyle()) for line in ax.get_lines()]


def test_one_run_has_one_colour_per_series():
    fig = timing_figure({"gtpo": ROWS})
    for ax in fig.axes:
        colours = [c for c, _ in _styles(ax)]
        assert len(colours) >= 2 and len(set(colours)) == len(colours), ax.get_title()


def test_several_runs_share_a_colour_per_run_and_differ_by_line_style():
    fig = timing_figure({"sync": ROWS, "async": ROWS})
    ax = fig.axes[0]
    styles = _styles(ax)
    assert len(styles) == 6
    by_run = [styles[:3], styles[3:]]
    assert {c for c, _ in by_run[0]} != {c for c, _ in by_run[1]}
    assert all(len({c for c, _ in run}) == 1 and len({s for _, s in run}) == 3 for run in by_run)
