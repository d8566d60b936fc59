"""Arc and label scores of a biaffine dependency parser, and one training step, with
``linmaps.torch.Biaffine`` (Dozat & Manning; supar's layout).

    python examples/biaffine_parser.py

One batch of random "sentences" (word vectors from a small encoder), gold heads and labels;
the arc scorer gives ``(batch, L, L)`` scores of every dependent against every head, the label
scorer ``(batch, n_labels, L, L)``. One SGD step on the cross-entropy of the gold arcs and of
the gold labels at the gold arcs. The script checks the scores against supar's einsum, and
exits with status 1 unless the loss on the same batch fell after the step.
"""

from __future__ import annotations

import sys

import torch

import linmaps.torch as lt


def supar_scores(x, y, weight):
    """supar.modules.affine.Biaffine's formula (ones appended to both inputs)."""
    x = torch.cat((x, torch.ones_like(x[..., :1])), -1)
    y = torch.cat((y, torch.ones_like(y[..., :1])), -1)
    s = torch.einsum("bxi,oij,byj->boxy", x, weight, y)
    return s.squeeze(1) if weight.shape[0] == 1 else s


class Parser(torch.nn.Module):
    def __init__(self, n_words, n_embed, n_arc, n_label_hidden, n_labels):
        super().__init__()
        self.embed = torch.nn.Embedding(n_words, n_embed)
        self.arc_dep = torch.nn.Linear(n_embed, n_arc)
        self.arc_head = torch.nn.Linear(n_embed, n_arc)
        self.label_dep = torch.nn.Linear(n_embed, n_label_hidden)
        self.label_head = torch.nn.Linear(n_embed, n_label_hidden)
        self.arc_attn = lt.Biaffine(n_arc, bias_x=True, bias_y=False)
        self.label_attn = lt.Biaffine(n_label_hidden, n_labels, bias_x=True, bias_y=True)
        for attn in (self.arc_attn, self.label_attn):  # supar starts at zeros; a little noise
            torch.nn.init.normal_(attn.weight, std=0.1)

    def forward(self, words):
        h = torch.relu(self.embed(words))
        s_arc = self.arc_attn(torch.relu(self.arc_dep(h)), torch.relu(self.arc_head(h)))
        s_label = self.label_attn(torch.relu(self.label_dep(h)), torch.relu(self.label_head(h)))
        return s_arc, s_label.permute(0, 2, 3, 1)  # (B, L, L), (B, L, L, n_labels)


def loss_of(s_arc, s_label, heads, labels):
    arc_loss = torch.nn.functional.cross_entropy(s_arc.flatten(0, 1), heads.flatten())
    gold = s_label.gather(2, heads[..., None, None].expand(-1, -1, 1, s_label.shape[-1]))
    label_loss = torch.nn.functional.cross_entropy(gold.flatten(0, 2), labels.flatten())
    return arc_loss + label_loss


def main() -> int:
    torch.manual_seed(0)
    batch, length, n_labels = 8, 20, 12
    model = Parser(n_words=500, n_embed=64, n_arc=100, n_label_hidden=50, n_labels=n_labels)
    words = torch.randint(0, 500, (batch, length))
    heads = torch.randint(0, length, (batch, length))
    labels = torch.randint(0, n_labels, (batch, length))

    s_arc, s_label = model(words)
    print(f"arc scores {tuple(s_arc.shape)}, label scores {tuple(s_label.shape)}")
    h = torch.relu(model.embed(words))
    reference = supar_scores(
        torch.relu(model.label_dep(h)), torch.relu(model.label_head(h)), model.label_attn.weight
    )
    torch.testing.assert_close(s_label.permute(0, 3, 1, 2), reference)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = loss_of(s_arc, s_label, heads, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_of(*model(words), heads, labels)
    print(f"loss {loss.item():.4f} -> {after.item():.4f} after one SGD step")
    return 0 if after < loss else 1


if __name__ == "__main__":
    sys.exit(main())
