"""The default corpus, a byte-level tokenizer and a resumable distributed sampler.

Nothing is downloaded: the corpus is generated from a small stochastic grammar with a fixed seed,
so it is identical on every machine, has real structure for a language model to learn (spelling,
word order, punctuation) and costs well under a second to make.

The sampler splits a *global* batch over the dp ranks: step s reads the same global windows for
any dp size, so a 2-rank run sees exactly the data of a 1-rank run (the basis of the
single-process-reference tests), and its position is two integers that a checkpoint can save.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

CORPUS_SEED = 1234

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the engineer", "a small bird", "the river",
             "our teacher", "the machine", "a quiet child", "the captain", "every student"]
_VERBS = ["sees", "likes", "builds", "follows", "remembers", "carries", "finds", "watches", "draws", "answers"]
_OBJECTS = ["a red ball", "the long road", "an open door", "the bright moon", "a wooden boat", "the last letter",
            "a green field", "the broken clock", "a warm fire", "the tall tower", "a new song"]
_ADVERBS = ["slowly", "today", "again", "at night", "with care", "in the morning", "near the sea", "without a word"]
_JOINS = [", and then", ", but", " because", " while", " so"]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(_ADVERBS)}"
    if rng.random() < 0.3:
        s += f"{rng.choice(_JOINS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])


def generate_corpus(n_bytes: int = 1 << 20, seed: int = CORPUS_SEED) -> str:
    """About n_bytes of grammatical English-like text; the same text for the same arguments."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) + "\n"
        parts.append(para)
        size += len(para)
    return "".join(parts)[:n_bytes]


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, no files."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def default_tokens(n_bytes: int = 1 << 20) -> torch.Tensor:
    return ByteTokenizer().encode(generate_corpus(n_bytes))


@dataclass
class SamplerState:
    epoch: int = 0
    step: int = 0  # global batches consumed in this epoch


class DistributedSampler:
    """Global batches of (input, target) windows, split over dp ranks; resumable.

    Windows are the non-overlapping chunks tokens[i*L : i*L + L + 1]; each epoch shuffles them with
    a generator seeded by (seed, epoch). A partial last batch of an epoch is dropped."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0):
        if global_batch % dp_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by dp {dp_size}; "
                             f"use a multiple of {dp_size}")
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < global_batch:
            raise ValueError(f"corpus of {len(tokens)} tokens has {self.n_windows} windows of {seq_len}, "
                             f"fewer than one batch of {global_batch}; lower train.batch_size or model.seq_len")
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.state = SamplerState()
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        return self.n_windows // self.global_batch

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.state.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state.epoch)
            self._perm = torch.randperm(self.n_windows, generator=g)
            self._perm_epoch = self.state.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: (inputs, targets), each (B/dp, seq_len)."""
        if self.state.step >= self.steps_per_epoch:
            self.state = SamplerState(self.state.epoch + 1, 0)
        local = self.global_batch // self.dp_size
        start = self.state.step * self.global_batch + self.dp_rank * local
        idx = self._permutation()[start: start + local]
        offsets = idx[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        chunk = self.tokens[offsets]
        self.state.step += 1
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "step": self.state.step, "seed": self.seed}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        if sd.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {sd['seed']} but this run uses seed {self.seed}; "
                             "resume with the same train.seed")
        self.state = SamplerState(int(sd["epoch"]), int(sd["step"]))
