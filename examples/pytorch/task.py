"""A plain PyTorch MLP, an nn.Module with its own training loop, federated by fedgrpc.

fedgrpc sees the model only through `get_weights` and `set_weights` (its state_dict as numpy
arrays, in a fixed order), so neither side of the run imports Keras or TensorFlow::

    pip install 'fedgrpc[torch]'
    fl-local --task examples/pytorch/task.py --clients 3 --rounds 5 --out results

Data: a site's own `--data FILE.npz` (arrays x: (n, 32) float32, y: (n,) class ids 0..9), or
else a synthetic stand-in (ten classes, each a noisy copy of its own prototype; the same seeded
draw on every side) cut into the sites' shards under the run's partitioning. The server
evaluates on examples of the stand-in that no site trains on.
"""

from __future__ import annotations

import numpy as np
import torch
from fedgrpc.common.task import Dataset, LocalData, Params, RoundContext, Site, Task
from torch import nn

FEATURES = 32
CLASSES = 10
EXAMPLES = 2000  # the stand-in dataset the sites' shards are cut from
HELD_OUT = 500  # examples of it kept for the server's central test set


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # logits


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(params: Params) -> MLP:
    # The server seeds torch (--init-seed) before this: every run starts from the same weights.
    return MLP(int(params["hidden_units"])).to(device())


def get_weights(model: MLP) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: MLP, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict())
    if len(weights) != len(keys):
        raise ValueError(f"{len(weights)} arrays for a model of {len(keys)} tensors")
    model.load_state_dict({k: torch.tensor(w) for k, w in zip(keys, weights, strict=True)})


def stand_in(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes, each a prototype plus noise twice its size: a few rounds to learn."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0.0, 1.0, (CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, EXAMPLES + HELD_OUT)
    x = prototypes[y] + rng.normal(0.0, 2.0, (len(y), FEATURES))
    return x.astype(np.float32), y.astype(np.int64)


def load_data(site: Site) -> LocalData:
    if site.data:
        with np.load(site.data, allow_pickle=False) as stored:
            x, y = stored["x"].astype(np.float32), stored["y"].astype(np.int64)
    else:
        x_all, y_all = stand_in()
        x, y = site.shard(x_all[:EXAMPLES], y_all[:EXAMPLES])
    cut = len(y) * 4 // 5  # a fifth held out, for federated evaluation
    return LocalData(train=(x[:cut], y[:cut]), test=(x[cut:], y[cut:]))


def load_test_data(site: Site) -> tuple[np.ndarray, np.ndarray]:
    x, y = stand_in()
    return x[EXAMPLES:], y[EXAMPLES:]


def train(model: MLP, data: LocalData, ctx: RoundContext) -> dict[str, float]:
    """ctx.epochs epochs of Adam (a new optimizer each round: none of its state carries over),
    shuffled mini-batches; under FedProx the loss also pulls toward the round's global weights."""
    x, y = (torch.from_numpy(a).to(device()) for a in data.train)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(ctx.params["learning_rate"]))
    anchors = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(ctx.round)
    model.train()
    for _ in range(ctx.epochs):
        for batch in torch.randperm(len(y), generator=generator).split(ctx.batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            if ctx.proximal_mu > 0:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True))
                loss = loss + ctx.proximal_mu / 2 * drift
            loss.backward()
            optimizer.step()
    return evaluate(model, data.train, ctx)


@torch.no_grad()
def evaluate(model: MLP, data: Dataset, ctx: RoundContext) -> dict[str, float]:
    x, y = (torch.from_numpy(np.asarray(a)).to(device()) for a in data)
    model.eval()
    logits = model(x)
    return {
        "loss": float(nn.functional.cross_entropy(logits, y)),
        "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
    }


task = Task(
    "pytorch-mlp",
    build_model,
    load_data,
    load_test_data=load_test_data,
    train=train,
    evaluate=evaluate,
    get_weights=get_weights,
    set_weights=set_weights,
    params={"hidden_units": 64, "learning_rate": 3e-3},
)
