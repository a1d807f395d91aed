"""Tokenisation of prompts and targets for editing: subject positions, target ids, padded batches.

Conventions shared by every editor (the authors' MEMIT/PMET code, where the paper is silent):

* targets are stored raw (``"English"``) and tokenised with a leading space (:func:`target_text`);
* the position an edit reads or writes is the subject's *last* token (MEMIT's ``fact_token="subject_last"``),
  found from the tokenizer's character offsets (:func:`encode_with_subject`);
* batches are right-padded (:func:`pad_right`), so a row gives the same result alone or in any batch (up to
  the last bits of floating-point sums, whose order depends on the padded length);
* the value optimisation of Eq. 10 runs one batch whose rows are every context-prefixed prompt followed by
  the target tokens but the last (teacher forcing), then the KL prompt (:func:`build_value_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def target_text(t: str) -> str:
    """Targets are stored raw (``"English"``); as MEMIT, they are tokenised with a leading space."""
    return t if t.startswith(" ") else " " + t


def fill_subject(template: str, subject: str) -> tuple[str, int]:
    """``template`` with its (first) ``{}`` replaced by ``subject``, and the character index where the
    subject ends."""
    i = template.find("{}")
    if i < 0:
        raise ValueError(f"template {template!r} has no '{{}}' for the subject")
    return template[:i] + subject + template[i + 2 :], i + len(subject)


def encode_with_subject(tok, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of the filled template and the index of the subject's last token (MEMIT's
    ``fact_token="subject_last"``), found from the tokenizer's character offsets."""
    text, end = fill_subject(template, subject)
    try:
        enc = tok(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        idx = max(i for i, (s, e) in enumerate(offsets) if s < end and e > s)
        return list(enc["input_ids"]), idx
    except (NotImplementedError, TypeError, KeyError):  # slow tokenizer: MEMIT's prefix-length rule
        ids = tok(text)["input_ids"]
        return list(ids), len(tok(text[:end])["input_ids"]) - 1


def target_ids(tok, target: str) -> list[int]:
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: real tokens keep positions 0..n-1 and never attend to padding (causal), so a row
    gives the same result alone or in any batch, up to rounding: the padded length changes the order of
    floating-point sums, which Eq. 10's optimisation amplifies to ~1e-4 relative (see
    :func:`pmet.editing.value_cache.resume_batches`)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tok) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pid is None else int(pid)


@dataclass
class ValueBatch:
    """The rows of one value optimisation (Eq. 10) over ``B`` requests with ``P`` prompts each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_req: torch.Tensor  # [N] request of each row
    lookup: torch.Tensor  # [N] subject's last token
    init_rows: torch.Tensor  # [B] row of each request's unprefixed prompt
    kl_rows: torch.Tensor  # [B]
    t_rows: torch.Tensor  # [M] target positions: row, position, token, rewriting-prompt index, request
    t_pos: torch.Tensor
    t_tok: torch.Tensor
    t_prompt: torch.Tensor
    t_req: torch.Tensor
    t_len: torch.Tensor  # [B * P] target length of each rewriting prompt
    n_prompts: int  # P


def build_value_batch(tok, requests: list[dict], templates: list[str], kl_prompt: str, device) -> ValueBatch:
    """Rows of request b: its P rewriting prompts (``templates`` in order, the first being ``"{}"``) then
    its KL prompt."""
    seqs, row_req, lookup, init_rows, kl_rows = [], [], [], [], []
    t_rows, t_pos, t_tok, t_prompt, t_req, t_len = [], [], [], [], [], []
    P = len(templates)
    for b, req in enumerate(requests):
        tgt = target_ids(tok, req["target_new"])
        for j, tmpl in enumerate(templates):
            ids, look = encode_with_subject(tok, tmpl.format(req["prompt"]), req["subject"])
            row = len(seqs)
            if j == 0:
                init_rows.append(row)
            n = len(ids)
            seqs.append(ids + tgt[:-1])
            row_req.append(b)
            lookup.append(look)
            for k, t in enumerate(tgt):
                t_rows.append(row), t_pos.append(n - 1 + k), t_tok.append(t)
                t_prompt.append(b * P + j), t_req.append(b)
            t_len.append(len(tgt))
        ids, look = encode_with_subject(tok, kl_prompt, req["subject"])
        kl_rows.append(len(seqs))
        seqs.append(ids)
        row_req.append(b)
        lookup.append(look)
    input_ids, mask = pad_right(seqs, pad_id_of(tok), device)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    return ValueBatch(
        input_ids,
        mask,
        t(row_req),
        t(lookup),
        t(init_rows),
        t(kl_rows),
        t(t_rows),
        t(t_pos),
        t(t_tok),
        t(t_prompt),
        t(t_req),
        t(t_len).float(),
        P,
    )


@dataclass
class SplitValueBatch:
    """A :class:`ValueBatch` cut at each row's subject's last token (the position δ is added at).

    Under causal attention the positions *before* that token never see δ, so their keys and values are the
    same at every step of Eq. 10: ``prefix_ids`` (left-padded to the longest prefix, ``[N, c]``) is run once,
    and every step runs only ``suffix`` (right-padded, ``[N, s]``), whose column 0 is the subject's last
    token (``suffix.lookup`` is 0) and whose target positions are renumbered accordingly. A KL row keeps
    only that one token (its distribution is read there)."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix: ValueBatch


def split_at_subject(bt: ValueBatch, pad_id: int) -> SplitValueBatch:
    """:class:`SplitValueBatch` of ``bt`` (see there)."""
    device = bt.input_ids.device
    lens = bt.attention_mask.sum(1).tolist()
    look = bt.lookup.tolist()
    is_kl = set(bt.kl_rows.tolist())
    prefixes, suffixes = [], []
    for i, ids in enumerate(bt.input_ids.tolist()):
        prefixes.append(ids[: look[i]])
        suffixes.append(ids[look[i] : look[i] + 1] if i in is_kl else ids[look[i] : lens[i]])
    c = max(len(p) for p in prefixes)
    prefix_ids = torch.full((len(prefixes), c), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(prefixes), c), dtype=torch.long)
    for i, p in enumerate(prefixes):
        if p:
            prefix_ids[i, c - len(p) :] = torch.tensor(p)
            prefix_mask[i, c - len(p) :] = 1
    s_ids, s_mask = pad_right(suffixes, pad_id, device)
    suffix = ValueBatch(
        s_ids,
        s_mask,
        bt.row_req,
        torch.zeros_like(bt.lookup),
        bt.init_rows,
        bt.kl_rows,
        bt.t_rows,
        bt.t_pos - bt.lookup[bt.t_rows],
        bt.t_tok,
        bt.t_prompt,
        bt.t_req,
        bt.t_len,
        bt.n_prompts,
    )
    return SplitValueBatch(prefix_ids.to(device), prefix_mask.to(device), suffix)
