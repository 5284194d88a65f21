"""DeepMask / SharpMask models. Importing this module registers, under the ``deepmask`` scope:

============================== =========== ===============================================
key                            registry    what (papers.md section)
============================== =========== ===============================================
deepmask.vgg_a                 backbone    VGG-A trunk of the NIPS model (1.1)
deepmask.resnet_trunk          backbone    mirror-padded core ResNet cut after res4 (2.1)
deepmask.head_c                head        shared 512-d vector (2.1 item 4)
deepmask.mask_head             head        Linear 512 -> 56 x 56 (2.1)
deepmask.score_head            head        dropout, 512 -> 1024, ReLU, dropout, -> 1 (2.1)
deepmask.nips_mask_head        head        NIPS segmentation branch (1.1)
deepmask.nips_score_head       head        NIPS score branch (1.1)
deepmask.sharpmask_refinement  head        SharpMask top-down refinement (3.1-3.2)
deepmask.logistic              loss        logistic loss on -1 / +1 labels (1.3)
deepmask.deepmask              meta_arch   trunk + heads (+ optional refinement)
deepmask.sharpmask             meta_arch   the same with a refinement (3.3)
deepmask.deepmask              proposal_   a frozen DeepMask model's full-image proposals
                               generator   for a two_stage model (papers.md 4)
deepmask.sharpmask             proposal_   the same for a SharpMask model
                               generator
============================== =========== ===============================================

Full-image inference (eval mode on whole images, papers.md 1.5, 2.4, 3.4):
:func:`full_image_inference` with :class:`InferenceSettings`; window geometry and pasting in
:mod:`.windows`.
"""
from . import (backbones, heads, losses, meta_arch, proposal_generator,  # noqa: F401
               refinement)
from .backbones import ResNetTrunk, VGGTrunk
from .heads import MaskHead, NipsMaskHead, NipsScoreHead, ScoreHead, SharedHead
from .inference import full_image_inference, predict_image
from .inference_settings import InferenceSettings
from .losses import PatchLogisticLoss
from .meta_arch import DeepMask
from .proposal_generator import DeepMaskProposals, SharpMaskProposals
from .refinement import SharpMaskRefinement
from .windows import paste_window_masks, window_boxes

__all__ = ["VGGTrunk", "ResNetTrunk", "SharedHead", "MaskHead", "ScoreHead", "NipsMaskHead",
           "NipsScoreHead", "SharpMaskRefinement", "PatchLogisticLoss", "DeepMask",
           "InferenceSettings", "full_image_inference", "predict_image", "paste_window_masks",
           "window_boxes", "DeepMaskProposals", "SharpMaskProposals"]
