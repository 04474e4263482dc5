"""
MultiModalClassifier: a frozen pretrained backbone + a RoutingHead on its hidden states of all depths.
"""
import torch.nn as nn

from .backbones import FrozenBackbone, load_backbone
from .checkpoints import from_pretrained
from .errors import UsageError
from .models import RoutingHead
from .pretrained import STATE_FILE_SUFFIXES, read_config

# -------------------------------------------------------------------------------------------------
# Frozen backbone + routing head
# -------------------------------------------------------------------------------------------------

class MultiModalClassifier(nn.Module):
    """A frozen pretrained backbone whose hidden states of all depths a RoutingHead classifies.

    backbone: a name for load_backbone, or a FrozenBackbone; head: a RoutingHead (default: a new one for
    n_classes). forward(batch) -> class scores [batch, n_classes]. Only the head trains, and only the head is
    saved: save_pretrained(folder) writes the head with the backbone's name and revision, and
    MultiModalClassifier.from_pretrained(folder or hub id) loads the head and the backbone it was trained on.
    """

    def __init__(self, backbone, n_classes=None, n_hid=64, revision=None, head=None):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, FrozenBackbone) else load_backbone(backbone, revision)
        self.head = head or RoutingHead(self.backbone.d_depth, self.backbone.d_emb, n_classes, n_hid)
        if (self.head.d_depth, self.head.d_emb) != (self.backbone.d_depth, self.backbone.d_emb):
            raise UsageError(f"the head routes {self.head.d_depth} depths x {self.head.d_emb}, but backbone "
                             f"{self.backbone.name!r} gives {self.backbone.d_depth} x {self.backbone.d_emb}")

    @property
    def modality(self):
        return self.backbone.modality

    def forward(self, batch):
        hidden, mask = self.backbone.encode(batch)                               # [batch, n_pos, d_depth, d_emb]
        return self.head(hidden.to(self.head.W.device), None if mask is None else mask.to(self.head.W.device))

    def save_pretrained(self, save_directory, **kwargs):
        return self.head.save_pretrained(save_directory, backbone=self.backbone.name,
                                         backbone_revision=self.backbone.revision, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, backbone=None, **kwargs):
        """A folder or hub id (save_pretrained), or a single head file that models.from_pretrained reads (the
        authors' 2022 .state_dict / .checkpoint files by their names). backbone: a name for load_backbone or a
        FrozenBackbone, for a file that names none (default: the one the file names)."""
        path = str(pretrained_model_name_or_path)
        if path.endswith(STATE_FILE_SUFFIXES):
            head, config = from_pretrained(path, backbone=getattr(backbone, 'name', backbone))
            if not isinstance(head, RoutingHead):
                raise UsageError(f"{path!r} holds a {type(head).__name__}, not a RoutingHead")
        else:
            config = read_config(path, revision=kwargs.get('revision'))
            head = RoutingHead.from_pretrained(path, **kwargs)
        if not (backbone or config.get('backbone')):
            raise UsageError(f"{path!r} names no backbone: pass backbone= (e.g. 'roberta-large'), or load the head "
                             f"alone with models.from_pretrained")
        return cls(backbone or config['backbone'], head=head, revision=config.get('backbone_revision'))
