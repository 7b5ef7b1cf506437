"""Greedy decoding with the KV cache, for evaluation: in one process, or (`synced`) on every rank of a
ZeRO-3 run at once, where each forward gathers parameters with the other ranks, so all must run the
same number of forwards: a rank whose answers have all ended goes on until every rank's have (as
transformers' `generate(synced_gpus=True)`)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .llava import VdepLlava


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The decoder's name for its KV cache: `cache` from transformers 5.24 (where `past_key_values` warns,
    and goes in 5.40), `past_key_values` before (where `cache` would be taken for an unknown keyword and
    decoding would silently run without the cache)."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(
    model: VdepLlava,
    prompts: list[list[int]],
    pixel_values: torch.Tensor,
    num_images: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    synced: bool = False,
    image_layout: torch.Tensor | None = None,
) -> list[list[int]]:
    """Continue each prompt greedily; returns the new tokens of each, up to and without the first stop
    token (EOS, or the template's end of turn: `ConversationTemplate.stop_token_ids`).

    Prompts are left-padded into one batch; `pixel_values` holds the images of the prompts that have
    one, in prompt order (plus a dummy row when none has); with `image_layout` (data/anyres.py), their views.
    """
    if not stop_token_ids:
        raise ValueError("greedy_generate needs at least one stop token id (the tokenizer has no EOS?)")
    device = pixel_values.device
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt, device=device)
        attention_mask[row, length - len(prompt):] = 1
    embeds = model.embed(input_ids, pixel_values, num_images, image_layout=image_layout)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.language_model.config)
    decoder = model.language_model
    # The model fills `cache` in place, so every step passes the same object.
    keyword = cache_keyword(decoder)
    outputs = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{keyword: cache})
    stops = torch.tensor(list(stop_token_ids), device=device)
    next_token = model.lm_head(outputs.last_hidden_state[:, -1]).argmax(dim=-1)
    generated = [next_token]
    finished = torch.isin(next_token, stops)
    for _ in range(max_new_tokens - 1):
        if all_finished(finished, synced):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        outputs = decoder(
            inputs_embeds=decoder.get_input_embeddings()(next_token[:, None]),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{keyword: cache},
        )
        next_token = model.lm_head(outputs.last_hidden_state[:, -1]).argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, stop_token_ids[0]), next_token)
        generated.append(next_token)
        finished |= torch.isin(next_token, stops)
    return [until_stop(row, stop_token_ids) for row in torch.stack(generated, dim=1).tolist()]


def all_finished(finished: torch.Tensor, synced: bool) -> bool:
    """Whether every answer has ended: this rank's, or with `synced` every rank's (collective)."""
    done = finished.all().to(torch.int64).reshape(1)
    if synced and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
    return bool(done.item())


def until_stop(tokens: list[int], stop_token_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    stop = next((index for index, token in enumerate(tokens) if token in stop_token_ids), len(tokens))
    return tokens[:stop]
