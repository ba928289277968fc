"""LLaVA-OneVision: SigLIP tower -> 2-layer GELU projector -> anyres packing / video pooling -> merge -> Qwen2.

Reference: transformers LlavaOnevisionModel / LlavaOnevisionForConditionalGeneration (SPEC §5). Module and
parameter names are the reference's in-memory names, so loading is a prefix rename (loading.py).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onevision import geometry
from onevision.config import LlavaOnevisionConfig
from onevision.models.cache import KVCache
from onevision.models import attention
from onevision.models.outputs import ModelOutput
from onevision.models.qwen2 import Qwen2Model
from onevision.models.siglip import SiglipVisionTower, activation


class LlavaOnevisionMultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaOnevisionConfig):
        super().__init__()
        layers = 1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer)
        bias, hidden = cfg.multimodal_projector_bias, cfg.text_config.hidden_size
        self.linear_1 = nn.Linear(cfg.vision_config.hidden_size * layers, hidden, bias=bias)
        self.act = activation(cfg.projector_hidden_act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def pack_anyres(features: torch.Tensor, size: tuple[int, int], newline: torch.Tensor | None,
                cfg: LlavaOnevisionConfig, vision_aspect_ratio: str) -> torch.Tensor:
    """One image's projected patches (1 + rows*cols, side*side, C) -> (729 + h*(w+1), C): base tokens, then the
    unpadded (and, above 1.1x the budget, bilinearly downscaled) grid row by row, a newline after each row."""
    side = cfg.vision_config.num_patches_per_side
    base, tiles = features[0], features[1:]
    if base.shape[0] != side * side:
        raise ValueError(f"anyres packing needs {side * side} tokens per patch, got {base.shape[0]}; "
                         "vision_feature_select_strategy='default' drops one and cannot be packed")
    rows, cols = geometry.anyres_grid(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    c = tiles.shape[-1]
    # (rows*cols, side*side, C) -> (C, rows*side, cols*side): tile (r, q) covers rows r*side.., cols q*side..
    grid = tiles.view(rows, cols, side, side, c).permute(4, 0, 2, 1, 3).reshape(c, rows * side, cols * side)
    row_slice, col_slice = geometry.unpad_slice(size, (rows * side, cols * side))
    grid = grid[:, row_slice, col_slice]
    target = geometry.downscaled_grid(tuple(grid.shape[1:]), side, geometry.max_patches_of(vision_aspect_ratio))
    if target is not None:
        grid = F.interpolate(grid[None], size=list(target), mode="bilinear")[0]
    h, w = grid.shape[1:]
    if newline is not None:
        grid = torch.cat((grid, newline[:, None, None].expand(c, h, 1).to(grid.dtype)), dim=-1)  # (C, h, w + 1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


def _with_newline(tokens: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
    """A multi-image member: its 729 tokens, then one newline."""
    return tokens if newline is None else torch.cat((tokens, newline[None].to(tokens.dtype)), dim=0)


class LlavaOnevisionModel(nn.Module):
    """Vision tower + projector + language model without the LM head."""

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        if not self.image_newline.is_meta:  # a fresh random model (from_pretrained builds on meta and loads it)
            with torch.no_grad():
                self.image_newline.normal_(0.0, config.text_config.hidden_size**-0.5)
        self.language_model = Qwen2Model(config.text_config)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> LlavaOnevisionModel:
        """Load a checkpoint's vision tower, projector and language model; its LM head is not read."""
        full = LlavaOnevisionForConditionalGeneration.from_pretrained(path_or_repo_id, _skip_lm_head=True, **kwargs)
        return full.model.eval()

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    # -- vision -------------------------------------------------------------------------------------------
    def _vision_features(self, pixel_values: torch.Tensor, vision_feature_layer, strategy: str) -> torch.Tensor:
        """(N, 3, 384, 384) -> projected (N, 729, C)."""
        layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
        hidden, _ = self.vision_tower(pixel_values, layers)
        return self.project(hidden, vision_feature_layer, strategy)

    def project(self, hidden: list[torch.Tensor], vision_feature_layer, strategy: str) -> torch.Tensor:
        """The tower's hidden states at the feature layer(s) -> projected (N, 729, C)."""
        # no copy for a single layer: the tower's output is channels-strided, and the reference feeds the
        # projector that same layout (a contiguous copy takes another bf16 matmul kernel, changing the bits)
        feats = hidden[0] if isinstance(vision_feature_layer, int) else torch.cat(hidden, dim=-1)
        if strategy == "default":
            feats = feats[:, 1:]
        elif strategy != "full":
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        return self.multi_modal_projector(feats)

    def _patches_per_image(self, image_sizes: torch.Tensor, batch_num_images) -> list[int]:
        n_images = len(image_sizes)
        if batch_num_images is None:
            patched = [True] * n_images
        else:
            counts = [int(n) for n in batch_num_images]
            patched = [n == 1 for n in counts for _ in range(n)]
            if len(patched) != n_images:
                raise ValueError(f"batch_num_images {counts} adds up to {len(patched)} images, but image_sizes has "
                                 f"{n_images} rows; pass the processor's batch_num_images unchanged")
        cfg = self.config
        return [geometry.num_anyres_patches(tuple(s), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                if p else 1 for s, p in zip(image_sizes.tolist(), patched)]

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                           vision_feature_layer=None, vision_feature_select_strategy: str | None = None,
                           vision_aspect_ratio: str | None = None, batch_num_images=None) -> ModelOutput:
        """pixel_values (N, P, 3, 384, 384) or (sum P, 3, 384, 384) -> .pooler_output: packed features per image,
        [(n_i, C)] (the reference's output shape)."""
        cfg = self.config
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or cfg.vision_feature_select_strategy
        aspect = vision_aspect_ratio or cfg.vision_aspect_ratio
        if image_sizes is None:
            raise ValueError("image_sizes is required with pixel_values (the processor returns both)")
        image_sizes = torch.as_tensor(image_sizes).reshape(-1, 2)
        counts = self._patches_per_image(image_sizes, batch_num_images)
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(counts):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes has {len(counts)}")
            if any(n > pixel_values.shape[1] for n in counts):
                raise ValueError(f"pixel_values has {pixel_values.shape[1]} patches per image, but the image sizes "
                                 f"need {max(counts)}; pass the processor's pixel_values and image_sizes together")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}, expected 4 or 5 dimensions")
        feats = self._vision_features(pixel_values, layer, strategy).split(counts, dim=0)
        packed = [self.pack_image(f, tuple(size), aspect) for f, size in zip(feats, image_sizes.tolist())]
        return ModelOutput(pooler_output=packed)

    # -- the vision stage on its own: features computed once can be passed to forward/generate -------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes, batch_num_images=None) -> list[torch.Tensor]:
        """Placeholder features per image [(n_i, C)]; pass them as forward(..., image_features=...)."""
        return list(self.get_image_features(pixel_values, image_sizes, batch_num_images=batch_num_images).pooler_output)

    def encode_videos(self, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        """Placeholder features per video [(T*pooled + 1, C)]; pass them as forward(..., video_features=...)."""
        return list(self.get_video_features(pixel_values_videos).pooler_output)

    # -- the engine's vision stage: tiles are encoded in any grouping, then packed per media item ------------
    def encode_tiles(self, tiles: torch.Tensor):
        """Start encoding (T, 3, H, W) tiles of any images or video frames (each tile is independent, so the
        engine groups them freely): returns a pass that `vision_tower.advance(pass, n)` runs n layers at a time,
        then `finish_tiles(pass)` -> projected (T, side*side, C) with the config's feature layer and strategy."""
        layer = self.config.vision_feature_layer
        return self.vision_tower.begin(tiles, [layer] if isinstance(layer, int) else list(layer))

    def finish_tiles(self, state) -> torch.Tensor:
        cfg = self.config
        return self.project(state.outputs(), cfg.vision_feature_layer, cfg.vision_feature_select_strategy)

    def pack_image(self, features: torch.Tensor, size: tuple[int, int], vision_aspect_ratio: str | None = None
                   ) -> torch.Tensor:
        """One image's projected tiles (P, side*side, C) -> its placeholder features (n, C): anyres packing when
        P > 1, else the single base tile (multi-image mode) and a newline."""
        aspect = vision_aspect_ratio or self.config.vision_aspect_ratio
        if features.shape[0] > 1:
            return pack_anyres(features, size, self.image_newline, self.config, aspect)
        return _with_newline(features[0], self.image_newline)

    def pack_video(self, features: torch.Tensor) -> torch.Tensor:
        """One video's projected frames (T, side*side, C) -> (T * pooled + 1, C): each frame's grid pooled 2x
        (bilinear), then one newline."""
        side = self.config.vision_config.num_patches_per_side
        t, _, c = features.shape
        grid = features.view(t, side, side, c).permute(0, 3, 1, 2)  # (T, C, side, side)
        pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        pooled = pooled.permute(0, 2, 3, 1).reshape(1, -1, c)  # (1, T*pooled, C)
        return torch.cat((pooled[0], self.image_newline[None].to(pooled.dtype)), dim=0)

    def pack_image_features(self, image_features, image_sizes, image_newline=None,
                            vision_aspect_ratio: str = "anyres_max_9"):
        """Reference-compatible packing of per-image (P, 729, C) features -> (list of (n_i, C), lengths).
        Like the reference, no newline tokens are added unless `image_newline` is given."""
        out = [pack_anyres(f, tuple(torch.as_tensor(s).tolist()), image_newline, self.config, vision_aspect_ratio)
               if f.shape[0] > 1 else _with_newline(f[0], image_newline)
               for f, s in zip(image_features, image_sizes)]
        return out, torch.tensor([o.shape[0] for o in out], dtype=torch.long, device=out[0].device)

    def get_video_features(self, pixel_values_videos: torch.Tensor, vision_feature_layer=None,
                           vision_feature_select_strategy: str | None = None) -> ModelOutput:
        """(B, T, 3, 384, 384) -> .pooler_output (B, T*196 + 1, C): each frame's 27x27 grid pooled to 14x14, one
        newline per video."""
        cfg = self.config
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos of shape {tuple(pixel_values_videos.shape)}, expected "
                             "(videos, frames, 3, height, width)")
        b, t = pixel_values_videos.shape[:2]
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or cfg.vision_feature_select_strategy
        feats = self._vision_features(pixel_values_videos.flatten(0, 1), layer, strategy)
        feats = feats.view(b, t, *feats.shape[1:])
        return ModelOutput(pooler_output=torch.stack([self.pack_video(f) for f in feats]))

    # -- merge ------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        """Boolean (B, S, 1) masks of the image and video placeholder positions; a count mismatch is a ValueError."""
        cfg = self.config
        if input_ids is None:
            embed = self.get_input_embeddings()
            ids = torch.tensor([cfg.image_token_index, cfg.video_token_index], device=inputs_embeds.device)
            image_vec, video_vec = embed(ids).to(inputs_embeds.dtype)
            image_mask = (inputs_embeds == image_vec).all(-1)
            video_mask = (inputs_embeds == video_vec).all(-1)
        else:
            image_mask, video_mask = input_ids == cfg.image_token_index, input_ids == cfg.video_token_index
        for kind, mask, feats in (("Image", image_mask, image_features), ("Video", video_mask, video_features)):
            if feats is not None and int(mask.sum()) * inputs_embeds.shape[-1] != feats.numel():
                raise ValueError(f"{kind} features and {kind.lower()} tokens do not match, tokens: {int(mask.sum())}, "
                                 f"features: {feats.shape[0]}. The prompt must hold exactly as many <{kind.lower()}> "
                                 "tokens as the processor inserted; build inputs with the processor.")
        return image_mask.unsqueeze(-1), video_mask.unsqueeze(-1)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, pixel_values_videos=None,
                image_sizes_videos=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                vision_aspect_ratio=None, batch_num_images=None, use_cache=None, output_hidden_states=None,
                output_attentions=None, cache=None, **kwargs) -> ModelOutput:
        kwargs.pop("cache_position", None)  # positions come from the cache's own length
        kwargs.pop("token_type_ids", None)
        kwargs.pop("mm_token_type_ids", None)  # an optional processor output the model does not need
        unknown = set(kwargs) - {"image_features", "video_features"}
        if unknown:
            raise TypeError(f"unexpected argument(s) {sorted(unknown)} to {type(self).__name__}.forward")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        past_key_values = cache if past_key_values is None else past_key_values
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features, video_features = kwargs.pop("image_features", None), kwargs.pop("video_features", None)
        per_image = image_features if isinstance(image_features, (list, tuple)) else None
        if image_features is None and pixel_values is not None:
            # the placeholder aspect ratio always comes from config, like the reference (SPEC §8.12)
            per_image = self.get_image_features(pixel_values, image_sizes, vision_feature_layer,
                                                vision_feature_select_strategy,
                                                batch_num_images=batch_num_images).pooler_output
            image_features = per_image
        if image_features is not None:  # computed here, or precomputed by encode_images
            if isinstance(image_features, (list, tuple)):
                image_features = torch.cat(list(image_features), dim=0)
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            mask, _ = self.get_placeholder_mask(input_ids, inputs_embeds, image_features=image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)
        if video_features is None and pixel_values_videos is not None:
            video_features = self.get_video_features(pixel_values_videos, vision_feature_layer,
                                                     vision_feature_select_strategy).pooler_output
        if video_features is not None:  # computed here, or precomputed by encode_videos
            if isinstance(video_features, (list, tuple)):
                video_features = torch.stack(list(video_features))
            flat = video_features.flatten(0, 1).to(inputs_embeds.device, inputs_embeds.dtype)
            _, mask = self.get_placeholder_mask(input_ids, inputs_embeds, video_features=flat)
            inputs_embeds = inputs_embeds.masked_scatter(mask, flat)
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            b, s, _ = inputs_embeds.shape
            past_key_values = self.language_model.make_cache(b, s, inputs_embeds.dtype, inputs_embeds.device)
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise TypeError(f"past_key_values must be a onevision KVCache (from a previous output), got "
                            f"{type(past_key_values).__name__}")
        # a cache that is passed in is read and extended even with use_cache=False, like the reference
        hidden, all_hidden, attentions = self.language_model(
            inputs_embeds, attention_mask, position_ids, past_key_values, bool(output_hidden_states),
            bool(output_attentions))
        return ModelOutput(last_hidden_state=hidden, past_key_values=past_key_values,
                           hidden_states=tuple(all_hidden) if all_hidden else None,
                           attentions=tuple(attentions) if attentions else None,
                           image_hidden_states=image_features, video_hidden_states=video_features,
                           image_outputs=None if image_features is None else ModelOutput(pooler_output=per_image),
                           video_outputs=None if video_features is None else ModelOutput(pooler_output=video_features))


class LlavaOnevisionForConditionalGeneration(nn.Module):
    """The full model with the LM head; `from_pretrained` / `save_pretrained` / `generate` like transformers."""

    def __init__(self, config: LlavaOnevisionConfig, attn_implementation: str | None = None):
        super().__init__()
        self.config = config
        self.model = LlavaOnevisionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.tie_weights()
        self.set_attn_implementation(attn_implementation or "sdpa")
        from onevision.generation.config import GenerationConfig  # data only; models never import generation code

        self.generation_config = GenerationConfig.from_model_config(config)

    # -- properties of the transformers API --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def language_model(self) -> Qwen2Model:
        return self.model.language_model

    @property
    def vision_tower(self) -> SiglipVisionTower:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> LlavaOnevisionMultiModalProjector:
        return self.model.multi_modal_projector

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_attn_implementation(self, name: str) -> None:
        name = attention.check_implementation(name)
        self.attn_implementation = name
        for module in self.modules():
            if hasattr(module, "impl"):
                module.impl = name

    def get_image_features(self, *args, **kwargs) -> ModelOutput:
        return self.model.get_image_features(*args, **kwargs)

    def get_video_features(self, *args, **kwargs) -> ModelOutput:
        return self.model.get_video_features(*args, **kwargs)

    # -- small conveniences of the transformers API ------------------------------------------------------
    main_input_name = "input_ids"

    def get_decoder(self) -> Qwen2Model:
        return self.model.language_model

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.language_model.embed_tokens = value
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def can_generate(self) -> bool:
        return True

    def num_parameters(self, only_trainable: bool = False) -> int:
        params = {id(p): p for p in self.parameters() if p.requires_grad or not only_trainable}
        return sum(p.numel() for p in params.values())

    def pack_image_features(self, *args, **kwargs):
        return self.model.pack_image_features(*args, **kwargs)

    def get_placeholder_mask(self, *args, **kwargs):
        return self.model.get_placeholder_mask(*args, **kwargs)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, pixel_values_videos=None,
                image_sizes_videos=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                vision_aspect_ratio=None, batch_num_images=None, labels=None, use_cache=None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states=None, output_attentions=None,
                cache=None, **kwargs) -> ModelOutput:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        ignore_index, shift_labels = kwargs.pop("ignore_index", -100), kwargs.pop("shift_labels", None)
        return_dict = kwargs.pop("return_dict", True)
        out = self.model(input_ids, pixel_values, image_sizes, pixel_values_videos, image_sizes_videos, attention_mask,
                         position_ids, past_key_values, inputs_embeds, vision_feature_layer,
                         vision_feature_select_strategy, vision_aspect_ratio, batch_num_images, use_cache,
                         output_hidden_states, output_attentions, cache, **kwargs)
        logits = self.lm_head(keep_positions(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, ignore_index, shift_labels)
        result = ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                             hidden_states=out.hidden_states, attentions=out.attentions,
                             image_hidden_states=out.image_hidden_states, video_hidden_states=out.video_hidden_states,
                             image_outputs=out.image_outputs, video_outputs=out.video_outputs)
        return result if return_dict else result.to_tuple()

    # -- loading / saving ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, dtype: Any = "auto",
                        device_map: Any = None, attn_implementation: str | None = None,
                        use_flash_attention_2: bool = False, torch_dtype: Any = None,
                        quantization_config: Any = None, compute: str = "auto", _skip_lm_head: bool = False,
                        **hub_kwargs: Any):
        """Build on the meta device and assign memory-mapped safetensors: peak memory ~ one copy of the weights.
        compute: "auto" picks the CPU kernels from what the CPU reports (onevision/cpu.py); "reference" keeps
        transformers' exact numerics for every dtype."""
        from onevision import cpu, loading, quantization

        unknown = set(hub_kwargs) - {"revision", "cache_dir", "token", "local_files_only", "force_download",
                                     "low_cpu_mem_usage", "trust_remote_code"}
        if unknown:
            raise TypeError(f"from_pretrained got unexpected argument(s) {sorted(unknown)}")
        hub = {k: v for k, v in hub_kwargs.items() if k not in ("low_cpu_mem_usage", "trust_remote_code")}
        if use_flash_attention_2:
            attn_implementation = "flash_attention_2"
        folder = loading.resolve_files(path_or_repo_id, ["*.json", "*.safetensors", "*.jinja", "*.txt"], **hub)
        config = LlavaOnevisionConfig.from_pretrained(folder)
        if torch_dtype is not None:
            loading.warn_once("`torch_dtype` is deprecated! Use `dtype` instead!")  # transformers 5's wording
            dtype = torch_dtype
        asked_fp16 = dtype in (torch.float16, "float16")
        dtype = loading.resolve_dtype(dtype, config.dtype, folder)
        device = loading.resolve_device(device_map)
        if asked_fp16:  # "auto" on an fp16 checkpoint is left alone: the CLI upcasts it on CPU itself
            loading.warn_if_slow_dtype(dtype, device)
        with loading.empty_init():
            model = cls(config, attn_implementation=attn_implementation)
        set_tensor = None
        if config.extra.get("quantization_config"):
            raise NotImplementedError(
                f"{path_or_repo_id} is a pre-quantized checkpoint (config.json has a quantization_config), which "
                "onevision cannot load; load the full-precision checkpoint with quantization_config=BitsAndBytesConfig(...)")
        cpu.fp16_compute_dtype(cpu.probe(), compute)  # validates `compute` before the checkpoint is read
        torchao = quantization_config is not None and quantization.is_torchao_config(quantization_config)
        if torchao:
            if device.type != "cpu":
                raise ValueError(f"TorchAoConfig weight-only int8/int4 runs onevision's packed CPU kernels; got "
                                 f"device_map={device_map!r}. Load with device_map='cpu', or use BitsAndBytesConfig on GPU")
            quantization.import_torchao()
        elif quantization_config is not None:
            set_tensor = quantization.prepare_quantized_loading(model, quantization_config, dtype, device)
        tied = config.tie_word_embeddings
        try:
            loading.load_checkpoint(model, folder, dtype, device,
                                    skip={"lm_head.weight"} if tied or _skip_lm_head else (),
                                    set_tensor=set_tensor)
        finally:
            if set_tensor is not None:  # the quantizer may still be packing the last weights
                set_tensor.finish()
        model.tie_weights()
        if torchao:
            quantization.quantize_torchao(model, quantization_config)
        if device.type == "cpu":
            cpu.apply_compute_paths(model, compute)
        rotary = model.model.language_model.rotary_emb
        rotary.inv_freq = rotary.compute_inv_freq(device)
        model.config.dtype = str(dtype).removeprefix("torch.")
        model.generation_config = type(model.generation_config).from_model_folder(folder, config)
        model.name_or_path = str(path_or_repo_id)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json, generation_config.json and safetensors in the llava-hf hub layout."""
        from onevision import loading

        if getattr(self, "is_quantized", False):
            raise NotImplementedError(
                "save_pretrained of a bitsandbytes-quantized model is not supported: onevision cannot load a "
                "pre-quantized checkpoint. Save the full-precision model and pass quantization_config to "
                "from_pretrained when loading it (quantization happens while the weights stream in).")
        os.makedirs(save_directory, exist_ok=True)
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        self.config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        loading.save_checkpoint(state, str(save_directory), _parse_size(max_shard_size))

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """transformers-style generate (see onevision.generation.generate)."""
        from onevision.generation.generate import generate

        return generate(self, *args, **kwargs)

    def stream(self, **kwargs):
        """Yield generated text pieces: `for piece in model.stream(**inputs, processor=processor, ...)`."""
        from onevision.generation.generate import stream

        return stream(self, **kwargs)


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions to project onto the vocabulary (the reference's slice_logits_to_keep): an int keeps the
    last k (0 = all); a 1-D tensor picks positions; a 2-D int tensor picks per row; a 2-D bool mask flattens."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep != 0 else hidden
    if logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    return hidden[:, logits_to_keep]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy in float32; ignore_index labels are ignored (the reference's ForCausalLMLoss)."""
    logits = logits.float()
    if shift_labels is None:
        shift_labels = F.pad(labels.to(logits.device), (0, 1), value=ignore_index)[:, 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.flatten(0, 1), shift_labels.to(logits.device).flatten(),
                           ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
