"""A private job among known machines: only peers given the token take part, however
many other volunteers there are."""

import trio

from lattice.core.state import Set


async def test_only_token_holders_are_sealed_and_the_job_runs_to_the_end(cluster, autojump_clock,
                                                                         small_job):
    submitter, friend, stranger, eager = await cluster.add(4)
    job_id = submitter.jobs.submit(small_job(min_peers=2, steps=30), access={"token": True})
    token = submitter.jobs.token(job_id)
    # a volunteer without the token writes a joined entry anyway (its own state)
    await cluster.wait_until(lambda: job_id in eager.store.jobs())
    eager.sync.write([Set(f"participation/{job_id}", {"state": "joined"})])
    assert friend.jobs.join(job_id, token)
    with trio.fail_after(600):
        summary = await stranger.jobs.wait_job(job_id)
    assert summary["status"] == "done"
    assert summary["roster"] == sorted([submitter.peer_id, friend.peer_id])
    view = stranger.jobs.get(job_id)
    assert stranger.peer_id not in view["participants"]  # never volunteered on its own
    assert view["participants"][eager.peer_id]["state"] in ("joined", "left")
    assert token not in repr(view)  # the token is nowhere in replicated state
