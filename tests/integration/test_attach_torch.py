"""The PyTorch path (CPU build), as the issue's user code runs it: two loops, each on its
own daemon, train a tiny model together through `DecentralizedTraining`; a float32 CPU
model trains in the shared memory itself, a float64 one is staged; the merged model
loads back into the module."""

import threading

import numpy as np
import pytest

import lattice
from lattice.client.localnet import LocalNet
from lattice.testing.daemons import wait_for

torch = pytest.importorskip("torch", reason="the torch path needs `pip install torch==2.13.0` "
                                             "(the extra lattice-p2p[torch])")
from lattice.torch import DecentralizedTraining  # noqa: E402

pytestmark = pytest.mark.integration


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.norm = torch.nn.BatchNorm1d(8)  # floating buffers are averaged too
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def train(socket, job, seed, dtype, out):
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    with lattice.connect(socket, timeout=120) as client:
        if seed:
            job = client.join_job(job["job_id"])  # as the other machines do
        with DecentralizedTraining(client, job, model, opt, timeout=120) as dt:
            out["start"] = model.fc1.weight.detach().clone()
            out["resident"] = dt.resident
            for _ in range(12):
                x = torch.randn(16, 4, generator=g, dtype=dtype)
                y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                dt.step(samples=len(x), loss=loss.item())
            out["shared"] = np.shares_memory(model.fc1.weight.detach().numpy(),
                                             dt.loop.slot) if dt.resident else False
            out["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out["model_id"] = dt.result.model_id
        dt.load_result()
        out["merged"] = {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["resident", "staged"])
def test_two_torch_loops_train_together(tmp_path, dtype):
    with LocalNet(2, tmp_path / "net", log_level="warning") as net:
        net.start()
        with lattice.connect(net.nodes[0].socket) as c:
            wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive")) >= 2, 60,
                     "2 live members", interval=0.1)
            job = c.submit_job({"kind": "attach", "name": "tiny", "min_peers": 2,
                                "sync_every": 3, "algorithm": "diloco",
                                "compression": "int8", "merge_timeout": 60})
        outs = [{}, {}]
        threads = [threading.Thread(target=train, args=(n.socket, job, i, dtype, outs[i]))
                   for i, n in enumerate(net.nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all("merged" in o for o in outs), outs
    assert [o["resident"] for o in outs] == [dtype == torch.float32] * 2
    assert all(o["shared"] for o in outs) == (dtype == torch.float32)
    torch.testing.assert_close(outs[0]["start"], outs[1]["start"])  # one start for all
    assert outs[0]["model_id"] == outs[1]["model_id"]
    for name in ("fc1.weight", "norm.running_mean", "fc2.bias"):
        expected = (outs[0]["final"][name].double() + outs[1]["final"][name].double()) / 2
        torch.testing.assert_close(outs[0]["merged"][name].double(), expected,
                                   rtol=1e-5, atol=1e-6)
    # integer buffers are not averaged: they stay the loop's own
    assert outs[0]["merged"]["norm.num_batches_tracked"] == 12
