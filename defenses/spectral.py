"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018) on the server's synthetic set."""
import torch

from defenses import DEFENSES
from defenses._synthetic import FilterThenRetrain, features_and_logits, per_class


@DEFENSES.register("spectral")
class SpectralSignatures(FilterThenRetrain):
    """Per label, the penultimate features of the pre-trained global model on the synthetic set are centred
    and projected on their top singular vector; the ``remove_share`` of the label's samples with the
    largest squared projection are flagged (the paper removes 1.5 x an assumed poison share eps; the
    default 0.15 assumes eps = 10 %). The model is then re-trained without them and they stay out of
    fusion. It assumes poison is a minority of its label, which a high poison rate breaks."""

    def __init__(self, remove_share: float = 0.15):
        super().__init__()
        if not 0 < remove_share < 1:
            raise ValueError(f"remove_share must be in (0, 1), got {remove_share}")
        self.remove_share = remove_share

    def flag(self, model, ctx):
        feats, _ = features_and_logits(model, ctx.synthetic.images, ctx.device)

        def outliers(idx):
            centred = feats[idx] - feats[idx].mean(0)
            top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            scores = (centred @ top) ** 2
            cut = int(round(self.remove_share * len(idx)))
            mask = torch.zeros(len(idx), dtype=torch.bool)
            mask[scores.argsort(descending=True)[:cut]] = True
            return mask

        return per_class(ctx.synthetic.labels, outliers)
