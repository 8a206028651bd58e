"""InstAlign's training objective (paper §3.4–3.7): Hungarian matcher, point sampling, criterion."""

from instalign.losses.criterion import Criterion, balanced_nt_pos_weight, build_criterion
from instalign.losses.matcher import HungarianMatcher
from instalign.losses.point_sampling import point_sample, uncertain_points, uniform_points

__all__ = ["Criterion", "HungarianMatcher", "balanced_nt_pos_weight", "build_criterion", "point_sample", "uncertain_points", "uniform_points"]
