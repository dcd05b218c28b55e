"""TokenCarve inside Hugging Face transformers models: one call, no fork of any modeling file.

    handle = tk_hf.apply_tokencarve(model, budget=128)   # or: with tk_hf.apply_tokencarve(model, budget=128):
    model.generate(**inputs)                            #         model.generate(**inputs)
    handle.remove()                                     # the model behaves exactly as before

During a prefill whose prompt holds image tokens, between decoder layers `layer - 1` and `layer`: each
image's span is located from the image-token positions in `input_ids` (and each image's token count from the
model's own image features), scored by the last valid prompt token's attention at layer `layer - 1`
(recomputed from that layer's queries and keys with `tokencarve::last_query_attention`, whatever attention
implementation the model runs), carved, and the forward continues on the shorter sequence. Kept tokens keep
their original position ids (RoPE, and Qwen2-VL's 3-D multimodal RoPE, at the original positions); the KV
cache of layers 0 .. layer - 1 is gathered with the same keep set; decode steps see the cache, the mask and
the positions consistently, with generated tokens numbered as without carving.

How it attaches, all on this model instance (nothing in transformers is edited; `remove()` undoes each):
  * the multimodal core (`model.model`): a forward pre-hook. At prefill it reads `input_ids` and the 2-D
    attention mask on the host: the integration's one host sync per prefill, which makes the image layout
    (how many images, where, how long) plain Python ints so that every op call after it is sync-free. In
    decode steps on a carved cache it remaps the 2-D mask's columns to the cache and fills missing position
    ids. Its `get_image_features` is wrapped on the instance to record each image's token count.
  * decoder layer `layer - 1`'s attention module: its config is a copy whose `_attn_implementation` names
    an entry registered in transformers' AttentionInterface; that entry keeps the post-RoPE keys and the
    last valid token's queries, then calls the original implementation (SDPA, FlashAttention, eager, ...)
    unchanged. No N x N attention matrix is ever built for the score.
  * decoder layers `layer` .. end: forward pre-hooks; the first one carves, and every one takes the shorter
    sequence's hidden states, attention mask (rebuilt by transformers' own mask functions for the shorter
    sequence), rotary embeddings and position ids (gathered at the kept tokens).
"""

import copy
import dataclasses
import functools
import inspect
import sys
import weakref
from collections.abc import Callable

import torch

import tokencarve_kernels as tk
from tokencarve_kernels.ops import ratio_budget

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicLayer
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as error:  # pragma: no cover
    raise ImportError("tokencarve_kernels.integrations.hf needs transformers: pip install 'tokencarve-kernels[hf]'") from error

_FAMILIES = {  # config.model_type -> (class name, text models it is tested with, 3-D rope)
    "llava": ("LlavaForConditionalGeneration", ("llama", "mistral"), False),
    "llava_next": ("LlavaNextForConditionalGeneration", ("llama", "mistral"), False),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", ("qwen2_vl_text",), True),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", ("qwen2_5_vl_text",), True),
}
_MERGE_MODES = ("mean", "similarity", "size")
_PATCHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()   # models (and their cores) under a handle

CarveFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def apply_tokencarve(
    model: torch.nn.Module,
    budget: int = 128,
    layer: int = 2,
    attn_weight: float = 0.5,
    rank: int = 0,
    merge: str = "mean",
    *,
    ratio: float | None = None,
    seed: int = 0,
    carve_fn: CarveFn | None = None,
) -> "TokenCarveHandle":
    """Turn TokenCarve on for `model`; returns a handle whose `remove()` (or `with` exit) turns it off.

    model: LlavaForConditionalGeneration (Llama or Mistral text model), LlavaNextForConditionalGeneration,
    Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration (or their base `.model`), with any
    attention implementation; choose the attention implementation before applying.
    budget: tokens kept per image, T = min(budget, Nv) (budget >= Nv keeps every token: the model's outputs
    are unchanged). ratio (0, 1]: instead of budget, T = max(1, ratio * Nv rounded half up) per image, for models whose
    images differ in size (LLaVA-NeXT, Qwen2-VL); when given it replaces budget.
    layer: carve between decoder layers `layer - 1` and `layer` (0-based), 1 <= layer < number of layers.
    attn_weight, rank, seed, merge: as in `tokencarve_kernels.carve`.
    carve_fn: another token-reduction method in TokenCarve's place, for evaluation harnesses:
    carve_fn(hidden [n, Nv, D], attn [n, Nv] float32, budget) -> (carved [n, T, D], keep_idx [n, T] int64),
    keep_idx ascending indices into the Nv tokens, T <= Nv the same for the n images of a call. It is called
    once per group of images with the same Nv and budget; attn_weight, rank, seed and merge are then unused.
    """
    core = model if hasattr(model, "language_model") else getattr(model, "model", None)
    family = _family(model, core)
    text_config = core.language_model.config
    num_layers = len(core.language_model.layers)
    if text_config.model_type not in _FAMILIES[family][1]:
        raise NotImplementedError(
            f"apply_tokencarve: {type(model).__name__} with a {text_config.model_type!r} text model is not supported; "
            f"tested text models: {', '.join(_FAMILIES[family][1])}")
    if ratio is None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"apply_tokencarve: budget must be an int >= 1 (visual tokens kept per image), got {budget!r}")
    elif not 0.0 < ratio <= 1.0:
        raise ValueError(f"apply_tokencarve: ratio must be in (0, 1], got {ratio!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ValueError(
            f"apply_tokencarve: layer must be an int in [1, {num_layers - 1}] (carving runs between decoder layers "
            f"layer - 1 and layer of this {num_layers}-layer text model), got {layer!r}")
    if not 0.0 <= attn_weight <= 1.0:
        raise ValueError(f"apply_tokencarve: attn_weight must be in [0, 1], got {attn_weight!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"apply_tokencarve: rank must be an int >= 0 (0 = exact information scores), got {rank!r}")
    if merge not in _MERGE_MODES:
        raise ValueError(f"apply_tokencarve: merge must be one of {_MERGE_MODES}, got {merge!r}")
    if carve_fn is not None and not callable(carve_fn):
        raise TypeError(f"apply_tokencarve: carve_fn must be callable or None, got {type(carve_fn).__name__}")
    if model in _PATCHED or core in _PATCHED:
        raise ValueError("apply_tokencarve: this model is already patched; remove() the existing handle first")
    return TokenCarveHandle(model, core, family, budget, ratio, layer, attn_weight, rank, seed, merge, carve_fn)


def _family(model: torch.nn.Module, core) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES or not hasattr(core, "language_model") or not hasattr(core, "get_image_features"):
        supported = ", ".join(name for name, _, _ in _FAMILIES.values())
        raise NotImplementedError(
            f"apply_tokencarve: model must be one of {supported} (or their base model), got {type(model).__name__} "
            f"(model_type {model_type!r})")
    return model_type


@dataclasses.dataclass
class _Image:
    sample: int
    start: int      # first token of the image in the prompt
    length: int     # Nv
    budget: int     # T requested (carve keeps min(T, Nv), carve_fn says how many)


@dataclasses.dataclass
class _Prefill:
    """What one prefill with image tokens needs, gathered as its forward runs."""

    ids: torch.Tensor                    # [B, N] int64 on the host
    mask: torch.Tensor | None            # [B, N] the 2-D attention mask as given (its device), None = no padding
    valid: torch.Tensor | None           # [B, N] bool on the host
    last: list[int]                      # each sample's last valid token
    counts: list[int] = dataclasses.field(default_factory=list)  # token count of each image, in prompt order
    query: torch.Tensor | None = None    # [B, Hq, d] layer layer-1's queries of each sample's last valid token
    key: torch.Tensor | None = None      # [B, Hk, N, d] its keys after RoPE
    scale: float = 1.0
    carved: "_Carved | None" = None


@dataclasses.dataclass
class _Carved:
    """The shorter sequence, as the layers from `layer` on see it."""

    hidden: torch.Tensor | None          # [B, N', D], handed to layer `layer` then dropped
    masks: dict                          # layer kind -> the attention mask the layers take
    position_embeddings: tuple
    position_ids: torch.Tensor | None


@dataclasses.dataclass
class _Decode:
    """A carved cache: what decode steps on it need."""

    length: int                          # N, the prompt's length before carving
    carved_length: int                   # N', its length in the cache
    mask: torch.Tensor | None            # [B, N'] 2-D mask of the carved prompt (0 at padding), None = all valid


class TokenCarveHandle:
    """The patch on one model. `remove()` restores it exactly; usable as a context manager.

    kept_positions: after a prefill that carved, [B, N'] int64: for each row of the shorter sequence (the rows
    of the logits it returned), the original prompt position it holds; -1 marks padding rows added when the
    samples of a batch were carved to different lengths. None before any carve.
    """

    def __init__(self, model, core, family, budget, ratio, layer, attn_weight, rank, seed, merge, carve_fn):
        self.model, self._core, self._family = model, core, family
        self.budget, self.ratio, self.layer = budget, ratio, layer
        self.attn_weight, self.rank, self.seed, self.merge, self.carve_fn = attn_weight, rank, seed, merge, carve_fn
        self.kept_positions: torch.Tensor | None = None
        self._image_token = core.config.image_token_id
        self._text_config = core.language_model.config
        self._layers = core.language_model.layers
        self._prefill: _Prefill | None = None
        self._decodes: "weakref.WeakKeyDictionary[object, _Decode]" = weakref.WeakKeyDictionary()
        self._hooks = []
        self._removed = False

        # layer - 1's attention: a config copy naming our registered implementation, which wraps the original
        self._attn = self._layers[layer - 1].self_attn
        self._attn_config = self._attn.config
        self._impl = self._attn_config._attn_implementation
        self._eager = getattr(sys.modules[type(self._attn).__module__], "eager_attention_forward", None)
        self._impl_name = f"tokencarve_capture_{id(self):x}"
        handle_ref = weakref.ref(self)

        def capture(module, query, key, value, attention_mask, **kwargs):
            return handle_ref()._capture(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self._impl_name, capture)
        capture_config = copy.copy(self._attn_config)
        capture_config._attn_implementation = self._impl_name
        self._capture_config = capture_config
        self._attn.config = capture_config

        self._hooks.append(core.register_forward_pre_hook(self._before_core, with_kwargs=True))
        self._hooks.append(core.register_forward_hook(self._after_core, always_call=True))
        if model is not core:
            self._hooks.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        kinds = [_layer_kind(self._text_config, i) for i in range(len(self._layers))]
        self._layer_kinds = {id(self._layers[i]): kinds[i] for i in range(layer, len(self._layers))}
        self._window = self._text_config.sliding_window if "sliding_attention" in kinds else None
        for i in range(layer, len(self._layers)):
            self._hooks.append(self._layers[i].register_forward_pre_hook(self._before_layer, with_kwargs=True))
        self._had_own_features = "get_image_features" in vars(core)
        original_features = core.get_image_features

        # generate() reads this method's signature to pre-compute the image features: keep it visible
        @functools.wraps(original_features)
        def get_image_features(*args, **kwargs):
            out = original_features(*args, **kwargs)
            handle = handle_ref()
            if handle is not None and handle._prefill is not None:
                handle._prefill.counts += _feature_counts(out)
            return out

        core.get_image_features = get_image_features
        self._original_features = original_features
        _PATCHED.add(model)
        _PATCHED.add(core)

    # ------------------------------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Remove every hook, the attention entry, the config copy and the wrapper: the model is as before."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        self._attn.config = self._attn_config
        # transformers has AttentionInterface.register but no unregister: drop our entry from its mapping.
        AttentionInterface._global_mapping.pop(self._impl_name, None)
        if self._had_own_features:
            self._core.get_image_features = self._original_features
        else:
            del self._core.get_image_features
        _PATCHED.discard(self.model)
        _PATCHED.discard(self._core)
        self._prefill = None
        self._decodes = weakref.WeakKeyDictionary()
        self._removed = True

    def __enter__(self) -> "TokenCarveHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------------ hooks
    def _before_model(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(
                "apply_tokencarve: labels are not supported while carving (the logits cover the shorter sequence); "
                "compute the loss on the unpatched model (handle.remove())")
        return None

    def _before_core(self, module, args, kwargs):
        self._prefill = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            if cache is not None:
                self._decodes.pop(cache, None)   # a reset cache starts over
            plan = self._plan(input_ids, kwargs.get("attention_mask"), kwargs.get("mm_encoder_outputs"))
            if plan is not None and getattr(cache, "offloading", False):
                # its layers move to the host after each update: refused before any work, not at the gather
                raise NotImplementedError(
                    "apply_tokencarve: carving needs a DynamicCache that stays on the model's device; got an offloaded "
                    f"{type(cache).__name__} (offloading=True): offloaded caches are not supported")
            self._prefill = plan
            return None
        decode = self._decodes.get(cache)
        if decode is None:
            return None
        return args, self._decode_kwargs(decode, kwargs, past, input_ids)

    def _after_core(self, module, args, output):
        self._prefill = None
        return None

    def _capture(self, module, query, key, value, attention_mask, **kwargs):
        plan = self._prefill
        if plan is not None and plan.query is None and query.shape[2] == plan.ids.shape[1]:
            samples = torch.arange(query.shape[0], device=query.device)
            plan.query = query[samples, :, torch.tensor(plan.last, device=query.device)]   # [B, Hq, d]
            plan.key = key
            plan.scale = kwargs.get("scaling") or module.scaling
        inner = ALL_ATTENTION_FUNCTIONS.get_interface(self._impl, self._eager)
        # FlashAttention reads module.config._attn_implementation to pick its kernel: show it the original
        module.config = self._attn_config
        try:
            return inner(module, query, key, value, attention_mask, **kwargs)
        finally:
            module.config = self._capture_config

    def _before_layer(self, module, args, kwargs):
        plan = self._prefill
        if plan is None:
            return None
        if plan.carved is None:
            if module is not self._layers[self.layer] or plan.query is None or not plan.counts:
                return None   # no image features were scattered into this prompt: it runs untouched
            hidden = args[0] if args else kwargs["hidden_states"]
            plan.carved = self._carve(plan, hidden, kwargs)
        carved = plan.carved
        kwargs = dict(kwargs)
        if carved.hidden is not None:
            if args:
                args = (carved.hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = carved.hidden
            carved.hidden = None
        kwargs["attention_mask"] = carved.masks[self._layer_kinds[id(module)]]
        kwargs["position_embeddings"] = carved.position_embeddings
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = carved.position_ids
        return args, kwargs

    # ------------------------------------------------------------------------------------------ prefill
    def _plan(self, input_ids, attention_mask, mm_encoder_outputs) -> _Prefill | None:
        """Host copy of the prompt's layout, or None when there is nothing to carve."""
        if input_ids is None:
            return None   # a prompt given as embeddings has no image-token positions: passed through
        ids = input_ids.detach().to("cpu", torch.long)
        if not bool((ids == self._image_token).any()):
            return None
        if self._window is not None and ids.shape[1] > self._window:
            # the layers after the carve would count the window in carved slots, not in original positions
            raise NotImplementedError(
                f"apply_tokencarve: a {ids.shape[1]}-token prompt is longer than the text model's sliding window "
                f"({self._window} tokens); prompts longer than a sliding window are not supported")
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise NotImplementedError(
                "apply_tokencarve: carving needs a 2-D attention_mask (or none); got a prepared "
                f"{type(attention_mask).__name__} mask (a static cache makes generate() build one: use the default cache)")
        valid = None if attention_mask is None else attention_mask.detach().to("cpu") != 0
        if valid is not None and bool(valid.all()):
            valid, attention_mask = None, None
        n = ids.shape[1]
        if valid is None:
            last = [n - 1] * ids.shape[0]
        else:
            if not bool(valid.any(dim=1).all()):
                raise ValueError("apply_tokencarve: attention_mask has a sample with no valid token")
            last = (n - 1 - valid.flip(1).int().argmax(dim=1)).tolist()
        plan = _Prefill(ids=ids, mask=attention_mask, valid=valid, last=last)
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            plan.counts = _feature_counts(mm_encoder_outputs["image"])
        return plan

    def _images(self, plan: _Prefill) -> list[_Image]:
        """Each image's span: runs of image tokens per sample, cut by the images' token counts (prompt order)."""
        counts = iter(plan.counts)
        images = []
        is_image = (plan.ids == self._image_token).tolist()
        for b, row in enumerate(is_image):
            j = 0
            while j < len(row):
                if not row[j]:
                    j += 1
                    continue
                end = j
                while end < len(row) and row[end]:
                    end += 1
                while j < end:   # adjacent images form one run
                    length = next(counts, None)
                    if length is None or j + length > end:
                        raise RuntimeError(
                            f"apply_tokencarve: the image tokens of sample {b} do not match the image features' "
                            f"token counts {plan.counts}")
                    if plan.valid is not None and not bool(plan.valid[b, j : j + length].all()):
                        raise ValueError(f"apply_tokencarve: attention_mask masks image tokens of sample {b}")
                    budget = self.budget if self.ratio is None else ratio_budget(self.ratio, length)
                    images.append(_Image(b, j, length, budget))
                    j += length
        if next(counts, None) is not None:
            raise RuntimeError(f"apply_tokencarve: more image features {plan.counts} than image tokens in the prompt")
        return images

    def _attention(self, plan: _Prefill, spans: list[int]) -> torch.Tensor:
        """The last valid token's head-mean attention at the flat [B * N] positions `spans`: [len(spans)] float32."""
        key, device = plan.key, plan.key.device
        batch, heads_k, n, dim = key.shape
        if plan.valid is None:   # no padding: every sample's last token is token N-1 and sees all N keys
            row = tk.last_query_attention(plan.query, key, 0, n, plan.scale, check_finite=False)   # [B, N]
            return row.reshape(-1)[torch.tensor(spans, device=device)]
        # padding: each sample's own valid keys, packed, scored by its last valid token (varlen op)
        keep = plan.valid & (torch.arange(n) <= torch.tensor(plan.last)[:, None])   # [B, N]: valid, up to the last
        flat = keep.reshape(-1)
        packed_index = torch.cumsum(flat.long(), 0) - 1      # original flat position -> packed row
        lengths = keep.sum(dim=1)
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        keys = key.transpose(1, 2).reshape(batch * n, heads_k, dim)[flat.nonzero().squeeze(1).to(device)]
        row = tk.last_query_attention_varlen(plan.query, keys, cu_seqlens.to(device), plan.scale, check_finite=False)
        return row[packed_index[spans].to(device)]

    def _carve_images(self, hidden: torch.Tensor, attn: torch.Tensor, images: list[_Image]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """hidden [sum Nv_i, D], attn [sum Nv_i] -> (kept per image, carved [sum T_i, D], keep_idx [sum T_i])."""
        lengths = [im.length for im in images]
        budgets = [im.budget for im in images]
        if self.carve_fn is None:
            if all(t >= n for t, n in zip(budgets, lengths)):   # every image kept whole: no scores to compute
                keep = torch.cat([torch.arange(n, device=hidden.device) for n in lengths])
                return lengths, hidden, keep
            if len(set(lengths)) == 1 and len(set(budgets)) == 1:
                n, length = len(images), lengths[0]
                carved, keep = tk.carve(hidden.view(n, length, -1), attn.view(n, length), budgets[0], self.attn_weight,
                                        self.rank, self.seed, self.merge, check_finite=False)
                return [carved.shape[1]] * n, carved.reshape(-1, hidden.shape[-1]), keep.reshape(-1)
            carved, keep = tk.carve_varlen(hidden, attn, lengths, budgets, attn_weight=self.attn_weight, rank=self.rank,
                                           seed=self.seed, merge=self.merge, check_finite=False)
            return [min(t, n) for t, n in zip(budgets, lengths)], carved, keep
        # carve_fn: one call per group of images with the same (Nv, budget)
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(lengths, budgets)):
            groups.setdefault(key, []).append(i)
        per_image: list = [None] * len(images)
        for (length, budget), members in groups.items():
            rows = torch.tensor([offsets[i] + j for i in members for j in range(length)], device=hidden.device)
            group_hidden = hidden[rows].view(len(members), length, -1)
            carved, keep = self.carve_fn(group_hidden, attn[rows].view(len(members), length), budget)
            kept = carved.shape[1] if carved.dim() == 3 else -1
            if (carved.dim() != 3 or carved.shape[0] != len(members) or carved.shape[2] != hidden.shape[-1]
                    or not 1 <= kept <= length or tuple(keep.shape) != (len(members), kept)):
                raise ValueError(
                    f"apply_tokencarve: carve_fn must return carved [n, T, D] = [{len(members)}, T, {hidden.shape[-1]}] "
                    f"and keep_idx [n, T] with 1 <= T <= Nv = {length}, got {tuple(carved.shape)} and {tuple(keep.shape)}")
            for k, i in enumerate(members):
                per_image[i] = (carved[k].to(hidden.dtype), keep[k].to(torch.long))
        kept = [c.shape[0] for c, _ in per_image]
        return kept, torch.cat([c for c, _ in per_image]), torch.cat([k for _, k in per_image]).to(hidden.device)

    def _carve(self, plan: _Prefill, hidden: torch.Tensor, kwargs: dict) -> _Carved:
        images = self._images(plan)
        batch, n, dim = hidden.shape
        device = hidden.device
        spans = [im.sample * n + im.start + i for im in images for i in range(im.length)]   # every image's rows, packed
        attn = self._attention(plan, spans)
        rows = torch.tensor(spans, device=device)
        kept, carved, keep = self._carve_images(hidden.reshape(batch * n, dim)[rows], attn, images)

        # the shorter sequence, laid out on the host: each slot holds an original position, or an image's
        # span start plus its entry in `keep`; samples carved shorter than the longest get leading padding slots
        by_sample = [[] for _ in range(batch)]
        for image, t in zip(images, kept):
            by_sample[image.sample].append((image, t))
        slot_pos, slot_img, slot_valid = [], [], []
        offset = 0   # into `keep`: images in prompt order, samples in order
        for b in range(batch):
            pos, img, j = [], [], 0
            for image, t in by_sample[b]:
                pos += range(j, image.start)
                img += [-1] * (image.start - j)
                pos += [image.start] * t
                img += range(offset, offset + t)
                offset += t
                j = image.start + image.length
            pos += range(j, n)
            img += [-1] * (n - j)
            slot_pos.append(pos)
            slot_img.append(img)
        new_len = max(map(len, slot_pos))
        for b in range(batch):
            pad = new_len - len(slot_pos[b])
            slot_valid.append([False] * pad + [True] * len(slot_pos[b]))
            slot_pos[b] = [0] * pad + slot_pos[b]
            slot_img[b] = [-1] * pad + slot_img[b]
        slot_img_t = torch.tensor(slot_img, device=device)
        is_image = slot_img_t >= 0
        src = torch.tensor(slot_pos, device=device) + torch.where(is_image, keep[slot_img_t.clamp(min=0)], 0)   # [B, N']
        valid = torch.tensor(slot_valid, device=device)

        new_hidden = _take(hidden, src, -2)
        new_hidden.view(batch * new_len, dim)[is_image.reshape(-1).nonzero().squeeze(1)] = carved.to(hidden.dtype)
        if plan.mask is None:
            mask = None if all(map(all, slot_valid)) else valid.long()
        else:
            mask = plan.mask.gather(1, src) * valid.to(plan.mask.dtype)
        self.kept_positions = torch.where(valid, src, -1)

        cache = _cache_of(kwargs)
        if cache is not None:
            self._gather_cache(cache, src, n)
            self._decodes[cache] = _Decode(length=n, carved_length=new_len, mask=mask)

        masks = {kind: (create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask)(
            self._text_config, new_hidden, mask, None) for kind in set(self._layer_kinds.values())}
        cos, sin = kwargs["position_embeddings"]
        position_ids = kwargs.get("position_ids")
        return _Carved(
            hidden=new_hidden, masks=masks, position_embeddings=(_take(cos, src, -2), _take(sin, src, -2)),
            position_ids=None if position_ids is None else _take(position_ids, src, -1))

    def _gather_cache(self, cache, src: torch.Tensor, n: int) -> None:
        """Layers 0 .. layer-1 already hold N entries: keep the same slots (gathered, never merged)."""
        for i in range(self.layer):
            entry = cache.layers[i]
            keys = getattr(entry, "keys", None)
            # quantized layers keep their states elsewhere and leave `keys` an empty 1-D tensor
            held = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else None
            if not isinstance(entry, DynamicLayer) or held != n:
                raise NotImplementedError(
                    f"apply_tokencarve: carving needs a DynamicCache whose layers hold the whole prompt; layer {i} is a "
                    f"{type(entry).__name__} with {held} slots for the {n}-token prompt (static, quantized or offloaded caches "
                    f"and prompts longer than a sliding window are not supported)")
            index = src[:, None, :, None].expand(-1, entry.keys.shape[1], -1, entry.keys.shape[-1])
            entry.keys = entry.keys.gather(2, index)
            entry.values = entry.values.gather(2, index[..., :1].expand(-1, -1, -1, entry.values.shape[-1]))
            if hasattr(entry, "cumulative_length"):
                entry.cumulative_length = src.shape[1]

    # ------------------------------------------------------------------------------------------ decode
    def _decode_kwargs(self, decode: _Decode, kwargs: dict, past: int, input_ids) -> dict:
        embeds = kwargs.get("inputs_embeds")
        steps = (input_ids if input_ids is not None else embeds).shape[1]
        if steps != 1:
            raise NotImplementedError(
                f"apply_tokencarve: a carved cache grows one token per step; got a {steps}-token step (assisted or "
                "speculative decoding, chunked prefill and continuing a carved cache with a new prompt are not supported)")
        kwargs = dict(kwargs)
        generated = past - decode.carved_length + steps       # tokens after the prompt, this one included
        mask = kwargs.get("attention_mask")
        batch = (input_ids if input_ids is not None else embeds).shape[0]
        if mask is not None and mask.dim() == 2:
            if mask.shape[1] != decode.length + generated:
                raise ValueError(
                    f"apply_tokencarve: the 2-D attention_mask of a decode step must cover the original prompt plus the "
                    f"generated tokens ({decode.length} + {generated}), got {mask.shape[1]} columns")
            head = decode.mask if decode.mask is not None else mask.new_ones(batch, decode.carved_length)
            kwargs["attention_mask"] = torch.cat([head.to(mask.dtype), mask[:, decode.length :]], dim=1)
        elif mask is None and decode.mask is not None:
            kwargs["attention_mask"] = torch.cat([decode.mask, decode.mask.new_ones(batch, generated)], dim=1)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self._decode_positions(past + decode.length - decode.carved_length, steps, batch)
        return kwargs

    def _decode_positions(self, past: int, steps: int, batch: int) -> torch.Tensor | None:
        """The position ids the unpatched model would derive for these tokens, from the uncarved cache length."""
        device = self._core.language_model.embed_tokens.weight.device
        positions = torch.arange(past, past + steps, device=device)
        if not _FAMILIES[self._family][2]:
            return positions[None]
        deltas = getattr(self._core, "rope_deltas", None)
        if deltas is None:
            return None
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(device)
        return positions.view(1, 1, -1).expand(3, batch, -1) + deltas


def _cache_of(found) -> object | None:
    """The KV cache in a forward's kwargs or in its output, under `cache` (transformers 5.2x's name) or the older
    `past_key_values`. A ModelOutput holds only its non-None fields as keys, so an output without a cache falls back."""
    return found.get("cache", found.get("past_key_values"))


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword model.forward takes a KV cache under: `cache` from transformers 5.2x (the old name is still
    accepted there), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _feature_counts(features) -> list[int]:
    """Token count of each image from what `get_image_features` returned (a list per image, or [n, L, D])."""
    features = getattr(features, "pooler_output", features)
    if isinstance(features, torch.Tensor) and features.dim() == 3:
        return [features.shape[1]] * features.shape[0]
    if isinstance(features, (list, tuple)) and all(isinstance(f, torch.Tensor) and f.dim() == 2 for f in features):
        return [f.shape[0] for f in features]
    raise RuntimeError(f"apply_tokencarve: cannot read per-image token counts from image features of type {type(features).__name__}")


def _layer_kind(config, index: int) -> str:
    """Which of transformers' mask functions builds decoder layer `index`'s mask."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def _take(t: torch.Tensor, src: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Per-sample gather along seq_dim (-1 or -2) of t [..., B or 1, N(, d)] with src [B, N'] -> [..., B, N'(, d)]."""
    batch_dim = seq_dim - 1
    shape = list(t.shape)
    shape[batch_dim] = src.shape[0]
    t = t.expand(shape)
    index = src if seq_dim == -1 else src[..., None]
    shape[seq_dim] = src.shape[1]
    return t.gather(seq_dim, index.expand(shape))
