"""Progress writes of a large job are spread so the job as a whole stays under a rate."""

import pytest

from lattice.jobs.supervisor import JobsConfig, progress_spacing


@pytest.mark.parametrize("roster", [1, 2, 4, 16, 48, 256, 1000])
def test_a_whole_job_writes_progress_at_most_progress_rate_times_a_second(roster):
    config = JobsConfig(progress_interval=1.0, progress_rate=8.0)
    spacing = progress_spacing(roster, config)
    assert roster / spacing <= config.progress_rate + 1e-9
    assert spacing >= config.progress_interval  # small jobs: as often as before, no more


def test_a_small_job_keeps_the_progress_interval():
    assert progress_spacing(8, JobsConfig(progress_interval=1.0, progress_rate=8.0)) == 1.0
    assert progress_spacing(256, JobsConfig(progress_interval=1.0, progress_rate=8.0)) == 32.0
