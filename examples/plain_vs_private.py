"""A plain PyTorch loop and the same loop made private: the diff is five lines (README.md, "A
plain loop and a private one"): a PrivacyEngine, make_private (three lines) and the epsilon.

Run: python examples/plain_vs_private.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazydp import PrivacyEngine

torch.manual_seed(0)
ids = torch.randint(0, 10_000, (5_000, 4))
labels = (ids[:, 0] % 2).float()
loader = DataLoader(TensorDataset(ids, labels), batch_size=256)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.EmbeddingBag(10_000, 16, mode="sum")
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(x)).squeeze(1)


model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

engine = PrivacyEngine()  # + private
model, optimizer, loader = engine.make_private(  # +
    module=model,
    optimizer=optimizer,
    data_loader=loader,  # +
    noise_multiplier=1.0,
    max_grad_norm=1.0,
    mode="lazydp",
)  # +

for epoch in range(3):
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()
    print(f"epoch {epoch}: epsilon = {engine.get_epsilon(delta=1e-5):.2f}")
print(engine.privacy_report(delta=1e-5))
