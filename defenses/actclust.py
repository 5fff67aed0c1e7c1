"""Activation clustering (Chen et al., AAAI SafeAI 2019) on the server's synthetic set."""
import numpy as np
import torch

from defenses import DEFENSES
from defenses._synthetic import FilterThenRetrain, features_and_logits, per_class
from fl_core.seeding import derive_seed


@DEFENSES.register("actclust")
class ActivationClustering(FilterThenRetrain):
    """Per label, the penultimate features of the pre-trained global model on the synthetic set are reduced
    to ``components`` (10) independent components (FastICA) and split in two by k-means; the smaller
    cluster is flagged when it holds at most ``max_share`` (0.35) of the label, the paper's relative-size
    analysis. The model is then re-trained without the flagged samples and they stay out of fusion."""

    def __init__(self, components: int = 10, max_share: float = 0.35):
        super().__init__()
        if components < 1 or not 0 < max_share < 0.5 + 1e-9:
            raise ValueError(f"components must be >= 1 and max_share in (0, 0.5], got {components}, {max_share}")
        self.components, self.max_share = components, max_share

    def flag(self, model, ctx):
        from sklearn.cluster import KMeans
        from sklearn.decomposition import FastICA

        feats, _ = features_and_logits(model, ctx.synthetic.images, ctx.device)
        seed = derive_seed(ctx.seed, "actclust") % 2**31

        def smaller_cluster(idx):
            x = feats[idx].numpy().astype(np.float64)
            n = min(self.components, x.shape[1], len(idx) - 1)
            if n < 1:
                return torch.zeros(len(idx), dtype=torch.bool)
            reduced = FastICA(n_components=n, random_state=seed, max_iter=400, whiten="unit-variance").fit_transform(x)
            assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
            small = int(np.bincount(assign, minlength=2).argmin())
            mask = torch.from_numpy(assign == small)
            return mask if mask.float().mean() <= self.max_share else torch.zeros(len(idx), dtype=torch.bool)

        return per_class(ctx.synthetic.labels, smaller_cluster)
