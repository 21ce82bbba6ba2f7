"""Pure jax.numpy ops (no flax): boxes, anchors, matching, sampling, NMS, RoIAlign (and RoIWarp,
RoIPool), masks, keypoints, and the convolution the models use (`conv_general_dilated`).

The functions are re-exported here, as `torchvision.ops` does: `from maskrcnn_jax.ops import
roi_align` gives the function. (As in torchvision, `maskrcnn_jax.ops.roi_align`,
`maskrcnn_jax.ops.roi_pool` and `maskrcnn_jax.ops.nms` therefore name functions, not modules;
`from maskrcnn_jax.ops.roi_align import multilevel_roi_align` still reads the module.)
"""
from maskrcnn_jax.ops.anchors import (
    cell_anchors,
    feature_grid_size,
    grid_anchors,
    multilevel_anchors,
)
from maskrcnn_jax.ops.boxes import (
    box_area,
    box_sizes_at_least,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    pairwise_iou,
    scale_boxes,
)
from maskrcnn_jax.ops.conv import conv_general_dilated
from maskrcnn_jax.ops.keypoints import heatmaps_to_keypoints, keypoints_to_heatmap
from maskrcnn_jax.ops.masks import paste_masks, project_mask_crops, select_class_channel
from maskrcnn_jax.ops.matching import MatchLabel, crowd_overlap, match_boxes
from maskrcnn_jax.ops.nms import batched_nms, nms
from maskrcnn_jax.ops.roi_align import (
    map_roi_levels,
    multilevel_roi_align,
    multilevel_roi_align_batched,
    multilevel_roi_warp_batched,
    roi_align,
    roi_align_batched,
    roi_warp,
)
from maskrcnn_jax.ops.roi_pool import multilevel_roi_pool_batched, roi_pool
from maskrcnn_jax.ops.sampling import sample_balanced, sample_indices

__all__ = [
    "MatchLabel", "batched_nms", "box_area", "box_sizes_at_least", "cell_anchors", "clip_boxes",
    "conv_general_dilated", "crowd_overlap", "decode_boxes", "encode_boxes", "feature_grid_size",
    "grid_anchors",
    "heatmaps_to_keypoints", "keypoints_to_heatmap",
    "map_roi_levels", "match_boxes", "multilevel_anchors", "multilevel_roi_align",
    "multilevel_roi_align_batched", "multilevel_roi_pool_batched", "multilevel_roi_warp_batched",
    "nms", "pairwise_iou", "paste_masks", "project_mask_crops", "roi_align", "roi_align_batched",
    "roi_pool", "roi_warp", "sample_balanced", "sample_indices", "scale_boxes",
    "select_class_channel",
]
