"""A linear-chain conditional random field: negative log-likelihood and Viterbi decoding."""

from __future__ import annotations

import torch
from torch import nn


class CRF(nn.Module):
    """Tag-transition scores on top of per-position emission scores.

    ``score(y) = start[y_0] + sum_t emit[t, y_t] + sum_t trans[y_{t-1}, y_t] + end[y_last]``;
    the loss is ``logsumexp over all y of score(y) - score(gold)``, averaged over the batch.
    Masks are left-aligned (every sequence is a prefix of the padded length).
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

    def neg_log_likelihood(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of ``tags`` (batch, length) under ``emissions`` (batch, length, tags)."""
        return (self._log_partition(emissions, mask) - self._gold_score(emissions, tags, mask)).mean()

    def _gold_score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        maskf = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)
        score = self.start[tags[:, 0]] + (emit * maskf).sum(1)
        trans = self.transitions[tags[:, :-1], tags[:, 1:]]
        score = score + (trans * maskf[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return score + self.end[last]

    def _log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        alpha = self.start + emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha.unsqueeze(2) + self.transitions + emissions[:, t].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, t].unsqueeze(1), step, alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    @torch.no_grad()
    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The highest-scoring tag sequence of each sentence (its unpadded length)."""
        score = self.start + emissions[:, 0]
        history = []
        for t in range(1, emissions.shape[1]):
            best, index = (score.unsqueeze(2) + self.transitions).max(dim=1)
            step = best + emissions[:, t]
            keep = mask[:, t].unsqueeze(1)
            score = torch.where(keep, step, score)
            history.append(torch.where(keep, index, torch.arange(score.shape[1]).expand_as(index)))
        score = score + self.end
        lengths = mask.sum(1).tolist()
        paths = []
        for i, length in enumerate(lengths):
            tag = int(score[i].argmax())
            path = [tag]
            for t in range(int(length) - 2, -1, -1):
                tag = int(history[t][i, tag])
                path.append(tag)
            paths.append(path[::-1])
        return paths
