"""The two models of the per-group cost benchmarks (``overhead.py --part layers`` and
``host_time.py --model``), as source that their subprocess scripts include: a GRU language
model and a 200-layer MLP, with their data (a fixed generator).

The scripts run as ``python -c`` (``host_time.py`` against another checkout too), so the models
travel as text; both include this one copy."""

MODELS = r"""
class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(64, 64)
        self.rnn = torch.nn.GRU(64, 144, batch_first=True)
        self.head = torch.nn.Linear(144, 64)
    def training_step(self, batch, i):
        x, y = batch
        h, _ = self.rnn(self.emb(x))
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(*[m for _ in range(200)
                                         for m in (torch.nn.Linear(64, 64), torch.nn.Tanh())])
    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

def model_and_loader(name, steps):
    g = torch.Generator().manual_seed(0)
    if name == "mlp200":
        x = torch.randn(steps * 32, 64, generator=g)
        return MLP, DataLoader(TensorDataset(x, torch.tanh(x.roll(1, 1))), batch_size=32)
    data = torch.randint(0, 64, (steps * 16, 33), generator=g)
    return LM, DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=16)
"""
