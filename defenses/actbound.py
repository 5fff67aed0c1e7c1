"""The paper's defense (Bi & Li, arXiv 2410.17573), as this project specifies it: activation constraints.

After each round's fusion, bounds on the outputs of hidden activation sites of every fused global
model are learned on the server's synthetic data only and applied as clamps through forward hooks;
model weights are never changed. The objective keeps the bounded model's outputs close to the
unbounded model's (KL or logit MSE) while a penalty shrinks the bounds; the penalty weight adapts
so that prediction agreement on synthetic data stays at ``target_agreement``. See docs/history/defense_selections.md
for the variants and what each reached.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from defenses import DEFENSES, Defense
from fl_core.activations import channel_peaks, site_outputs, sites_of
from fl_core.data import ImageData, to_float
from fl_core.seeding import torch_generator

SHAPES = ("channel", "element")
INITS = ("quantile", "meanstd", "robust", "constant")
FILTERS = ("none", "activation")


@dataclass
class BoundState:
    """One prototype's bounds: upper = init * exp(theta) per site; clamps read it at every forward."""

    owners: dict[str, nn.Module]
    init: dict[str, torch.Tensor]
    theta: dict[str, torch.Tensor]
    lower: dict[str, torch.Tensor] = field(default_factory=dict)
    enabled: bool = False
    broadcast: bool = False
    lam: float = 1.0
    handles: list = field(default_factory=list)

    def upper(self, site: str) -> torch.Tensor:
        return self.init[site] * self.theta[site].exp()


def _view(bound: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Broadcast a (C,) or (C, H, W) bound against an output (B, C, ...)."""
    if bound.dim() == 1:
        return bound.view(1, -1, *([1] * (out.dim() - 2)))
    return bound.unsqueeze(0)


def clamp(state: BoundState, name: str, out: torch.Tensor) -> torch.Tensor:
    """``out`` of site ``name`` clamped to the state's bounds."""
    clamped = torch.minimum(out, _view(state.upper(name), out))
    if name in state.lower:
        clamped = torch.maximum(clamped, _view(state.lower[name], out))
    return clamped


def attach_clamps(state: BoundState) -> None:
    """Forward hooks clamping each site's output to its bounds while ``state.enabled``.

    Copies of the model (the clients' models) carry the hooks; they clamp only if ``state.broadcast``.
    """
    for name, module in state.owners.items():
        def hook(mod, args, out, name=name):
            if not state.enabled or (mod is not state.owners[name] and not state.broadcast):
                return None
            return clamp(state, name, out)

        state.handles.append(module.register_forward_hook(hook))


def clamp_model(state: BoundState, model: nn.Module) -> list:
    """Forward hooks clamping another model of the same architecture (e.g. a teacher) with the state's
    bounds while ``state.enabled``; returns the handles (remove them to undo)."""
    sites = sites_of(model)
    return [sites[name].register_forward_hook(
        lambda mod, args, out, name=name: clamp(state, name, out) if state.enabled else None) for name in state.owners]


def median_and_mad(values: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and median absolute deviation along ``dim`` (dimension kept)."""
    med = values.median(dim=dim, keepdim=True).values
    return med, (values - med).abs().median(dim=dim, keepdim=True).values


def robust_z(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD) along ``dim``."""
    med, mad = median_and_mad(values, dim)
    return (values - med) / (1.4826 * mad + 1e-6)


def class_margins(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """logit of ``classes`` minus the largest other logit, per row."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf")).amax(1)
    return own - others


def max_margin_inputs(model: nn.Module, probes: torch.Tensor, classes: torch.Tensor, steps: int,
                      lr: float) -> torch.Tensor:
    """Signed-gradient ascent of each probe image in [0, 1] towards the largest margin of its class.

    A backdoored class reaches an abnormally large margin from almost any start (the MM-BD signature,
    Wang et al. 2024); only the probes change, never the model or its bounds.
    """
    x = probes.detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            grad, = torch.autograd.grad(class_margins(model(x), classes).sum(), x)
            x = (x.detach() + lr * grad.sign()).clamp_(0, 1)
    return x


def abnormal_samples(model: nn.Module, images: torch.Tensor, sites: list[str], z: float,
                     granularity: str = "channel") -> torch.Tensor:
    """Flag samples whose activations are abnormal (robust statistics, no labels needed).

    Per site, each unit (a channel's spatial peak, or with ``granularity: element`` each channel and
    position) of each sample is scored by its robust z against the whole set; a sample's score is its
    largest z over sites and units; samples whose score is a robust outlier among all scores
    (modified z > ``z``) are flagged.
    """
    reduce = (lambda o: o.flatten(1)) if granularity == "element" else channel_peaks
    units = site_outputs(model, images, sites, reduce)
    score = torch.stack([robust_z(u).amax(1) for u in units.values()]).amax(0)
    return robust_z(score) > z


@DEFENSES.register("actbound")
class ActivationBounds(Defense):
    """Activation constraints learned on synthetic data during fusion (the paper's defense).

    Parameters (defaults in brackets):
      sites ["all"]: every activation site, or a list of site names.
      shape ["channel"]: per-channel bounds, or "element" (per channel and position, UNIT-like);
      element_sites [0]: with shape "channel", the first N sites use per-element bounds instead.
      lower [False]: also clamp from below at the (1 - init_q) quantile (fixed, not learned).
      init ["quantile"] with init_q [0.999]; "meanstd" (mean + init_k std, init_k [4]); "robust" (median +
        init_k MAD of each channel's per-sample peak, or of each element where bounds are per element: not
        moved by a minority of triggered samples);
        "constant" (init_value).
      objective ["kl"] or "mse" (logit MSE) between bounded and unbounded outputs on synthetic data.
      target_agreement [0.95]: prediction agreement with the unbounded model that steers the penalty weight.
      steps [150] first fit, refine_steps [30] per later round (warm start), lr [0.05], batch_size [128].
      trim [0.25]: robust preservation, ignore the worst-preserved share of each batch (the best variant
        measured, see docs/history/defense_selections.md; 0 gives the plain MM-BM-style objective).
      filter ["none"] or "activation": exclude synthetic samples with abnormal peak activations
        (robust z > filter_z [3.5]; per channel peak, or filter_unit "element": per channel and position)
        from the preservation term, and from fusion if filter_fusion [True].
      margin_weight [0]: MMAC-style data-free backdoor-signature term (Wang et al. 2024): per class,
        margin_probes [2] inputs start from seeded noise, climb 10 x margin_steps signed-gradient steps
        before the first bound update (their margin there is the reference), then margin_steps [3] steps
        (step margin_lr [0.02]) per bound update towards the class's largest margin under the current
        bounds; the bounds are then also pushed to shrink the mean of those margins (relative to their
        value at the start of the fit, so the weight is scale-free).
      retry_fresh [False]: a warm-started fit that never meets the agreement target is run again, for
        ``steps`` steps, from fresh starting bounds of the current model (instead of keeping those).
      during_fusion [False]: bounds active on the student while the server distils.
      broadcast [False]: bounds stay active in the model sent to clients.
    """

    consumes = frozenset({"synthetic"})
    omit_at_default = {"retry_fresh": False}  # added after results were published
    kept_trim: float | None = None  # trim of the bounds the model keeps after a round (None: ``trim``)
    deploy_bounds: bool = True  # the model evaluated and kept after a round runs under its bounds

    def __init__(self, sites: str | list = "all", shape: str = "channel", element_sites: int = 0,
                 lower: bool = False, init: str = "quantile", init_q: float = 0.999, init_k: float = 4.0,
                 init_value: float = 10.0, objective: str = "kl", target_agreement: float = 0.95,
                 steps: int = 150, refine_steps: int = 30, lr: float = 0.05, batch_size: int = 128,
                 trim: float = 0.25, filter: str = "none", filter_z: float = 3.5, filter_unit: str = "channel",
                 filter_fusion: bool = True, margin_weight: float = 0.0, margin_probes: int = 2,
                 margin_steps: int = 3, margin_lr: float = 0.02,
                 during_fusion: bool = False, broadcast: bool = False, retry_fresh: bool = False):
        checks = [(shape in SHAPES, f"shape {shape!r} unknown; valid: {', '.join(SHAPES)}"),
                  (init in INITS, f"init {init!r} unknown; valid: {', '.join(INITS)}"),
                  (objective in ("kl", "mse"), f"objective {objective!r} unknown; valid: kl, mse"),
                  (filter in FILTERS, f"filter {filter!r} unknown; valid: {', '.join(FILTERS)}"),
                  (filter_unit in SHAPES, f"filter_unit {filter_unit!r} unknown; valid: {', '.join(SHAPES)}"),
                  (0.5 < init_q < 1, "init_q must be in (0.5, 1)"),
                  (0 < target_agreement <= 1, "target_agreement must be in (0, 1]"),
                  (0 <= trim < 1, "trim must be in [0, 1)"),
                  (steps >= 1 and refine_steps >= 0, "steps >= 1 and refine_steps >= 0 are required"),
                  (lr > 0 and batch_size >= 1 and element_sites >= 0, "lr > 0, batch_size >= 1, element_sites >= 0"),
                  (margin_weight >= 0 and margin_probes >= 1 and margin_steps >= 1 and margin_lr > 0,
                   "margin_weight >= 0, margin_probes >= 1, margin_steps >= 1 and margin_lr > 0 are required"),
                  (sites == "all" or isinstance(sites, list), "sites must be 'all' or a list of site names")]
        for ok, why in checks:
            if not ok:
                raise ValueError(why)
        self.sites, self.shape, self.element_sites, self.lower = sites, shape, element_sites, lower
        self.init, self.init_q, self.init_k, self.init_value = init, init_q, init_k, init_value
        self.objective, self.target_agreement = objective, target_agreement
        self.steps, self.refine_steps, self.lr, self.batch_size, self.trim = steps, refine_steps, lr, batch_size, trim
        self.filter, self.filter_z, self.filter_unit, self.filter_fusion = filter, filter_z, filter_unit, filter_fusion
        self.margin_weight, self.margin_probes, self.margin_steps, self.margin_lr = (
            margin_weight, margin_probes, margin_steps, margin_lr)
        self.during_fusion, self.broadcast, self.retry_fresh = during_fusion, broadcast, retry_fresh
        self._states: dict[int, BoundState] = {}
        self._flagged: dict[int, torch.Tensor] = {}
        self._log: list[dict] = []

    # ------------------------------------------------------------ set-up

    def chosen_sites(self, model: nn.Module) -> list[str]:
        names = list(sites_of(model))
        if self.sites == "all":
            return names
        unknown = [s for s in self.sites if s not in names]
        if unknown:
            raise ValueError(f"unknown activation site(s) {unknown}; valid: {', '.join(names)}")
        return list(self.sites)

    def initial_bounds(self, model: nn.Module, images: torch.Tensor) -> tuple[dict, dict]:
        """Upper (and lower) starting bounds per site from activation statistics on synthetic data."""
        sites = self.chosen_sites(model)
        outs = site_outputs(model, images[:1000], sites, lambda o: o.float())
        uppers, lowers = {}, {}
        for i, site in enumerate(sites):
            acts = outs[site]
            per_element = self.shape == "element" or i < self.element_sites
            flat = acts.transpose(0, 1).flatten(1) if not per_element else acts.flatten(1).T  # (units, samples)
            shape = acts.shape[1:] if per_element else acts.shape[1:2]
            if self.init == "quantile":
                upper = torch.quantile(flat, self.init_q, dim=1)
            elif self.init == "meanstd":
                upper = flat.mean(1) + self.init_k * flat.std(1)
            elif self.init == "robust":
                # median + k * MAD of each channel's per-sample spatial peak: a minority of triggered
                # samples with abnormal peaks cannot move it (unlike a quantile or mean + k std)
                # (per element: median + k * MAD of each unit over the samples, so a fixed-position trigger
                # carried by a minority of samples is above the bound of the positions it occupies)
                med, mad = median_and_mad(flat.T if per_element else channel_peaks(acts))
                upper = (med + self.init_k * 1.4826 * mad).squeeze(0)
            else:
                upper = torch.full((flat.shape[0],), float(self.init_value))
            uppers[site] = upper.clamp_min(1e-3).reshape(shape)
            if self.lower:
                lowers[site] = torch.quantile(flat, 1 - self.init_q, dim=1).view(shape)
        return uppers, lowers

    def state_for(self, model: nn.Module, prototype: int, images: torch.Tensor) -> BoundState:
        if prototype not in self._states:
            uppers, lowers = self.initial_bounds(model, images)
            owners = {s: sites_of(model)[s] for s in uppers}
            state = BoundState(owners, uppers, {s: torch.zeros_like(u) for s, u in uppers.items()}, lowers,
                               broadcast=self.broadcast)
            attach_clamps(state)
            self._states[prototype] = state
        return self._states[prototype]

    # ------------------------------------------------------------ learning

    def preservation_data(self, prototype: int, synthetic: ImageData) -> torch.Tensor:
        flagged = self._flagged.get(prototype)
        return synthetic.images if flagged is None else synthetic.images[~flagged.to(synthetic.images.device)]

    def fit(self, model: nn.Module, state: BoundState, images: torch.Tensor, steps: int, key: tuple,
            trim: float | None = None) -> dict:
        """Fit the bounds to preserve the unbounded model's outputs on ``images`` (``descend``; with
        ``retry_fresh``, a descent that never met the target is followed by a full one from fresh starting
        bounds). Returns the agreement on (up to 2,000 of) the preservation samples, lam, the normalised
        bound size and whether it fell back (and, after a retry, whether that fell back too)."""
        trim = self.trim if trim is None else trim
        was_training = model.training
        model.eval()
        grads = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        device = next(model.parameters()).device
        state.enabled = False
        with torch.no_grad():
            reference = torch.cat([model(to_float(images[i: i + 500].to(device))) for i in range(0, len(images), 500)])
        fallback = self.descend(model, state, images, reference, steps, key, trim)
        retried = {}
        if fallback and self.retry_fresh:  # fit again, from the fresh bounds the descent fell back to
            state.lam = 1.0
            retried["fresh_fallback"] = float(self.descend(model, state, images, reference, self.steps,
                                                           (*key, "fresh"), trim))
        with torch.no_grad():
            probe = images[:2000]
            bounded = torch.cat([model(to_float(probe[i: i + 500].to(device))).argmax(-1)
                                 for i in range(0, len(probe), 500)])
            agreement = float((bounded == reference[: len(probe)].argmax(-1)).float().mean())
            penalty = float(torch.stack([t.exp().mean() for t in state.theta.values()]).mean())
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
        return {"agreement": agreement, "lam": state.lam, "penalty": penalty, "fallback": float(fallback), **retried}

    def descend(self, model: nn.Module, state: BoundState, images: torch.Tensor, reference: torch.Tensor,
                steps: int, key: tuple, trim: float) -> bool:
        """Adam on log-scale bounds: preservation (+ trimming) + lam * mean(upper / init); lam adapts to the
        agreement target (measured on the preserved share of each batch), and the last bounds that met it
        on a batch are kept; if none did, fresh starting bounds of this model (returns True: fell back).
        Leaves the bounds enabled."""
        device = reference.device
        thetas = [state.theta[s].requires_grad_(True) for s in state.theta]
        opt = torch.optim.Adam(thetas, lr=self.lr)
        gen = torch_generator(key[0], "actbound", *key[1:])
        state.enabled = True
        feasible = None  # the last bounds that met the target on a batch
        if self.margin_weight > 0:
            classes = torch.arange(reference.shape[1], device=device).repeat_interleave(self.margin_probes)
            probes = max_margin_inputs(model, torch.rand((len(classes), *images.shape[1:]), generator=gen).to(device),
                                       classes, 10 * self.margin_steps, self.margin_lr)
            with torch.no_grad():
                start_margin = class_margins(model(probes), classes).mean().clamp_min(1e-3)
        for _ in range(steps):
            idx = torch.randint(0, len(images), (min(self.batch_size, len(images)),), generator=gen)
            x, ref = to_float(images[idx.to(images.device)].to(device)), reference[idx.to(device)]
            out = model(x)
            if self.objective == "kl":
                per_sample = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True,
                                      reduction="none").sum(-1)
            else:
                per_sample = (out - ref).pow(2).mean(-1)
            keep = torch.ones_like(per_sample, dtype=torch.bool)
            if trim > 0:
                k = max(1, int(round((1 - trim) * len(per_sample))))
                keep = torch.zeros_like(keep)
                keep[per_sample.topk(k, largest=False).indices] = True
            penalty = torch.stack([state.theta[s].exp().mean() for s in state.theta]).mean()
            loss = per_sample[keep].mean() + state.lam * penalty
            if self.margin_weight > 0:
                probes = max_margin_inputs(model, probes, classes, self.margin_steps, self.margin_lr)
                margin = class_margins(model(probes), classes).mean()
                loss = loss + self.margin_weight * margin / start_margin
            with torch.no_grad():  # the outputs above were produced by the current bounds
                agree = (out.argmax(-1) == ref.argmax(-1))[keep].float().mean()
                if agree >= self.target_agreement:
                    feasible = {s: t.detach().clone() for s, t in state.theta.items()}
                state.lam = min(1e4, state.lam * 1.2) if agree >= self.target_agreement else max(1e-4, state.lam / 1.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            fallback = feasible is None
            if fallback:  # never met (e.g. a warm start too tight for a new model): fresh bounds of this model
                state.enabled = False
                fresh, _ = self.initial_bounds(model, images)
                feasible = {s: (fresh[s] / state.init[s]).log() for s in state.theta}
                state.enabled = True
            for site, t in state.theta.items():
                t.requires_grad_(False)
                t.copy_(feasible[site])
        return fallback

    # ------------------------------------------------------------ hooks

    def changes_broadcast(self, round_idx):
        return self.broadcast and bool(self._states)  # clamps reach the clients once bounds exist

    def before_round(self, global_model, prototype, ctx):
        state = self._states.get(prototype)
        if state is not None:
            state.enabled = self.broadcast

    def on_fusion(self, plan, global_model, ctx):
        if self.filter == "activation":
            flagged = abnormal_samples(global_model, ctx.synthetic.images, self.chosen_sites(global_model),
                                       self.filter_z, self.filter_unit)
            previous = self._flagged.get(plan.prototype)  # once abnormal, always excluded
            flagged = flagged.cpu() | previous if previous is not None else flagged.cpu()
            self._flagged[plan.prototype] = flagged
            if self.filter_fusion:
                plan.keep = plan.keep & ~flagged.to(plan.keep.device)
            ctx.report(flagged_synthetic=flagged.nonzero().flatten().tolist())
        if self.during_fusion:
            images = self.preservation_data(plan.prototype, ctx.synthetic)
            new = plan.prototype not in self._states
            state = self.state_for(global_model, plan.prototype, images)
            if new:
                self.fit(global_model, state, images, self.steps, (ctx.seed, ctx.round, "fusion"))
            state.enabled = True
        return plan

    def after_round(self, global_model, prototype, ctx):
        images = self.preservation_data(prototype, ctx.synthetic)
        first = prototype not in self._states
        state = self.state_for(global_model, prototype, images)
        steps = self.steps if first else self.refine_steps
        info = self.fit(global_model, state, images, steps, (ctx.seed, ctx.round), self.kept_trim) if steps else {}
        flagged = self._flagged.get(prototype)
        self._log.append({"round": ctx.round, "prototype": prototype, "steps": steps,
                          "flagged": int(flagged.sum()) if flagged is not None else 0, **info})
        ctx.report(**{k: round(v, 4) for k, v in info.items()})
        state.enabled = self.deploy_bounds
        return global_model

    def detach(self) -> None:
        """Remove every clamp hook (the models behave exactly as before the defense)."""
        for state in self._states.values():
            for handle in state.handles:
                handle.remove()
            state.handles.clear()
        self._states.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for p, state in self._states.items():
            for site in state.theta:
                out[f"{p}/{site}/upper"] = state.upper(site).detach()
                if site in state.lower:
                    out[f"{p}/{site}/lower"] = state.lower[site]
        for p, flagged in self._flagged.items():
            out[f"{p}/flagged"] = flagged
        return out

    def describe(self) -> dict:
        return {**super().describe(), "fits": self._log}
