"""The pure, I/O-free core of SMC steering (Lew et al. 2023): the proposal, the extension of a
particle, the step (reweight, resample), resampling schemes, potentials, and a single-process
reference driver that runs all of them on the server's own potentials."""

from .driver import ALL_VIOLATED, OK, Particle, SMCResult, propose, run_smc, run_smc_steer
from .model import LM, FeynmanKacModel, State
from .resampling import SCHEMES, inverse_cdf, multinomial, resample, residual, stratified, systematic
from .weights import AllWeightsZero, ess, log_mean_exp, logsumexp, normalize
from .without_replacement import (
    CStar,
    SteerStep,
    WRResample,
    find_c_star,
    resample_without_replacement,
    steer_candidates,
    steer_resample,
)

__all__ = [
    "ALL_VIOLATED",
    "OK",
    "Particle",
    "SMCResult",
    "propose",
    "run_smc",
    "run_smc_steer",
    "LM",
    "FeynmanKacModel",
    "State",
    "SCHEMES",
    "inverse_cdf",
    "multinomial",
    "resample",
    "residual",
    "stratified",
    "systematic",
    "AllWeightsZero",
    "ess",
    "log_mean_exp",
    "logsumexp",
    "normalize",
    "CStar",
    "SteerStep",
    "WRResample",
    "find_c_star",
    "resample_without_replacement",
    "steer_candidates",
    "steer_resample",
]
