"""Workloads for ``smcserve bench``: what to send and when.

Every workload is an iterable of ``(send_time_s, RequestSpec)``, send times relative to the start of
the run and non-decreasing. A :class:`Workload` also says how many requests may be in flight at once
(``max_concurrency``; ``None`` = unbounded, the request times alone decide).

- ``poisson``: a fixed request rate with exponential inter-arrival times.
- ``gamma``: gamma-distributed inter-arrival times with shape ``k`` (the burstiness, as in vLLM's
  ``--burstiness``) and mean ``1/rate``: ``k = 1`` is Poisson, ``k < 1`` burstier, ``k > 1`` more regular.
- ``concurrency``: N requests in flight at all times (every send time 0, ``max_concurrency = N``).
- ``sweep``: one Poisson (or gamma) run per rate; see :func:`sweep_workloads`.
- ``trace``: Mooncake JSONL replay; see :mod:`loadtest.trace`.

Prompts. The public API takes text, so a prompt is built from :data:`WORDS`, a fixed list of 1,024
lowercase pseudo-words; a prompt of ``n`` "tokens" is ``n`` words joined by single spaces and
``RequestSpec.token_ids`` holds their indices in :data:`WORDS`. Every word in the list is a single token
of the default model's tokenizer (SmolLM2), both with a leading space and at the start of a text, and
the pre-tokenizer splits at spaces, so on that model the server's prompt token count equals the word
count exactly (checked over random prompts when the list was made). Other tokenizers split some words
into several tokens: the server's count, and where its KV block boundaries fall, then differ somewhat
from the word count; prefixes shared as words are still shared as tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

# 1,024 words; each is one SmolLM2 token with and without a leading space. Do not reorder: the trace's
# hash-id → block mapping (and so every replay's prompts) depends on the indices.
WORDS: tuple[str, ...] = tuple(
    """
about above academ academic accept access according account action actions active activity actually adapt
added adding address adjust adult advanced after again agricult allow almost along already also altern
although always among amount analy analysis animal animals another answer anti antib apply appro arch area
around article articles assert associ attention author authors autom available average avoid baby back balance
ball base based basic because before begin behavior being below best better between bill birds birth black
block blood blue board body bone book books born both bottom bound brain break broad build building built burn
business calcul call camp cancer cand capital capt carbon card care case cast cele cell cent center central
century certain chall change changes changing chapter char character check chem chemical child children choice
choose chronic church circ city civil class clean clear climate clinical close code cold coll collect college
color colors column comb come comm command commit common commun community comp compan compar compared compet
complete complex comput computer conc condition conf config conflict conn connect cons consider const constant
construct cont contact contains content context contin continue control conv cook cool coord copy core correct
cost could count counter country course cover creat create created creating creation creative cred crit
critical cross cult cultural culture current currently custom daily dark data date days dead death decl deep
default depending desc design dest details determ develop device diabetes diagn diff different digital direct
disc dise display dist distance doctor document does dogs done down draw drive drug during each early earth
easy eating econom economic educ education effect effective effects eight either elect electric element
elements email emotional employ energy engine ensure enter equal error essential estab even event events ever
every evidence evolution exam example examples except exec exercise exper expl exposure external extra extract
face fact factor factors failure fair fall family farm fast father feature features feed female field fields
figure file files final financial find finding fine fire first fish five flex flow focus follow following food
foods foot force fore foreign forest form format former forward found four free freedom fresh friends from
front fruit full function functions fund future game gard gather gender gene general generally generate gets
getting give given global goal going gold good govern grant graph great greater green ground group groups
growing growth guid guide half hand hard harm have having head health healthy heart heat height help here high
higher hist history hold home host house however human ident identity image images impact import important
impro incre index init initial input inside insp inst install instance instead integ inter interest intern
internal introdu invest iron issue item items joint journal just keep keeping kids kind king know knowledge
known label land language large last late later layer lead learn learning leave left legal length less letter
level library life light like limit line lines link list liter little live living load local located location
long look looking loss love lower mach machine made magn main major make making male manufact many mark market
mass master material materials math mean meaning means measure media medical medicine member members memory
mental mess message method methods micro middle military mill mind miss mission model modern money month more
most mother mount move moving much mult multi multiple music must name named names national native natural
nature near need negative neigh network never news next night norm normal north note notes nothing number
numbers nutrition object objects occup ocean offic office often older once online only open oper operation
optim option options order organ organic orig origin original other others output outside over pack page pain
paper param parent parents part particip pass past path patient patients pattern peace people percent perhaps
period pers person personal philos phot phys physical pick pict picture place plan plant plants plastic play
playing plot point points policy political poll poly poor popular port position positive possible post
potential power pract practice prec pred predict pregn prep pres present press pressure prevent previous price
prim primary princ print prior priv private prob probably problem problems process produ product prof prog
program progress project prom prop property prot protein prov psych public published purpose qual quality
quant quest question questions quick race random range rate rather read reading ready real reason recent
recogn recomm record reduce reducing reference region regular related relations rele release religious
remember remove report represent requ request required research resource resources resp respons response rest
result results return review rich right risk river road rock role room root round rout rule rules running safe
safety sample sand save scale schol school science scient scre search season second secret section security
seed seek select self sent sequ series serv service setting settings seven several sexual shape share sharing
short should show side sign signal similar simple since sing single site size skin sleep slow small smart soci
social soft software soil solar solid solution some something sometimes soon sort sound source sources south
space spec special species specific speech speed spirit spring staff stage stand standard star start starting
stat state statement states status stay step steps still stop storage store story stra strategy streng stress
string strong struct structure stud student students studies study style subject subst success such sugar
suggest summer super supp support surface surv symbol system table take taking talk target task teacher
teachers teaching team techn tele tell term test testing tests text that their then there these they things
think thinking third this those though three through thus time times title today together tool tools topic
total track trade train training trans transform transl transport travel treat treatment tree trees true trust
truth turn type types typically under unique unit units univers until upon upper urban used user users using
usually util vacc value values vari veget version very video view vision visit visual volume walk wall want
watch water weather week weight well what when where whether which while white whole wild will wind winter
with within without women wood word words work working works world would writ write writing written year years
young your
""".split()
)
assert len(WORDS) == 1024, len(WORDS)


def ids_to_text(ids: Sequence[int]) -> str:
    """The prompt text of word ids: the words joined by single spaces."""
    return " ".join(WORDS[i] for i in ids)


def word_block(key: int | str, length: int, salt: int | str = 0) -> list[int]:
    """A FIXED pseudo-random block of ``length`` word ids for ``key`` (e.g. a trace hash id).

    Deterministic in (``salt``, ``key``) across runs and machines; a shorter ``length`` gives a prefix of
    the longer block, so a block cut short is a prefix of the same block in full.
    """
    rng = random.Random(f"smcserve-block:{salt}:{key}")
    return [rng.randrange(len(WORDS)) for _ in range(length)]


@dataclass
class RequestSpec:
    """One request to send: a raw prompt (text; ``token_ids`` are the word ids it was built from)."""

    prompt: str
    max_tokens: int
    token_ids: list[int] | None = None
    steering: dict | None = None  # {"particles": N, "potentials": [...]} → an SMC request
    ignore_eos: bool = True  # so that output lengths are the requested ones
    temperature: float | None = None  # None: the server's default
    seed: int | None = None  # sampling seed (reproducible outputs)
    hash_ids: tuple[int, ...] = ()  # trace replay: the row's block ids
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "smc" if self.steering else "text"

    @property
    def prompt_len(self) -> int:
        """The intended prompt length (words; the server's token count on the default model)."""
        return len(self.token_ids) if self.token_ids is not None else len(self.prompt.split())


@dataclass
class Workload:
    """An iterable of ``(send_time_s, RequestSpec)`` plus how it is to be driven."""

    name: str
    items: Iterable[tuple[float, RequestSpec]]
    max_concurrency: int | None = None
    num_requests: int | None = None  # how many it yields when finite and known
    config: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[float, RequestSpec]]:
        return iter(self.items)


# --- arrival processes --------------------------------------------------------------------------------
def gamma_arrivals(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Send times (s) of a renewal process with gamma(k = burstiness, θ = 1/(rate·k)) inter-arrivals.

    Mean inter-arrival 1/rate for every k; the first request goes at t = 0. ``rate = inf`` sends
    everything at once. Infinite: stop it by count or time.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    t = 0.0
    while True:
        yield t
        if math.isfinite(rate):
            t += float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))


def poisson_arrivals(rate: float, seed: int = 0) -> Iterator[float]:
    """Poisson arrivals: exponential inter-arrival times with mean 1/rate (gamma with k = 1)."""
    return gamma_arrivals(rate, 1.0, seed)


# --- request mixes ------------------------------------------------------------------------------------
@dataclass
class SmcMix:
    """Turn a fraction ``ratio`` of the requests into SMC-steered ones (chosen by a seeded coin)."""

    ratio: float = 0.0
    particles: int = 8
    max_word_length: int = 8
    max_tokens: int | None = 16  # cap on the output length of SMC requests (None: no cap)
    potentials: list[dict] | None = None  # default: [{"kind": "max_word_length", "max_len": max_word_length}]

    def steering(self) -> dict:
        pots = (
            self.potentials
            if self.potentials is not None
            else [{"kind": "max_word_length", "max_len": self.max_word_length}]
        )
        return {"particles": self.particles, "potentials": [dict(p) for p in pots]}

    def apply(self, items: Iterable[tuple[float, RequestSpec]], seed: int = 0) -> Iterator[tuple[float, RequestSpec]]:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"SMC ratio must be in [0, 1], got {self.ratio}")
        rng = random.Random(f"smc-mix:{seed}")
        for t, spec in items:
            if self.ratio > 0 and rng.random() < self.ratio:
                max_tokens = spec.max_tokens if self.max_tokens is None else min(spec.max_tokens, self.max_tokens)
                spec = replace(spec, steering=self.steering(), max_tokens=max(1, max_tokens))
            yield t, spec


def random_specs(
    input_len: int,
    max_tokens: int,
    seed: int = 0,
    *,
    salt: int | str = 0,
    temperature: float | None = None,
    ignore_eos: bool = True,
) -> Iterator[RequestSpec]:
    """Independent random prompts of ``input_len`` words (no shared prefixes), ``max_tokens`` each.

    ``salt`` changes the prompts but not the sampling seeds (a sweep salts each run, so that one run's
    prompts are not in the prefix cache when the next starts).
    """
    if input_len < 1 or max_tokens < 1:
        raise ValueError("input_len and max_tokens must be >= 1")
    rng = random.Random(f"random-specs:{seed}:{salt}")
    i = 0
    while True:
        ids = [rng.randrange(len(WORDS)) for _ in range(input_len)]
        yield RequestSpec(
            ids_to_text(ids),
            max_tokens,
            token_ids=ids,
            ignore_eos=ignore_eos,
            temperature=temperature,
            seed=request_seed(seed, i),
        )
        i += 1


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request ``index`` of a run seeded ``seed`` (a uint64)."""
    return (seed * 1_000_003 + index) % (1 << 63)


def _take(it: Iterable, n: int | None) -> Iterator:
    for i, x in enumerate(it):
        if n is not None and i >= n:
            return
        yield x


def rate_workload(
    rate: float,
    *,
    burstiness: float = 1.0,
    num_requests: int | None = None,
    input_len: int = 64,
    max_tokens: int = 16,
    seed: int = 0,
    smc: SmcMix | None = None,
    max_concurrency: int | None = None,
    temperature: float | None = None,
    ignore_eos: bool = True,
    salt: int | str = 0,
) -> Workload:
    """Random prompts at ``rate`` req/s, Poisson (burstiness 1) or gamma arrivals."""
    items = zip(
        gamma_arrivals(rate, burstiness, seed),
        random_specs(input_len, max_tokens, seed, salt=salt, temperature=temperature, ignore_eos=ignore_eos),
    )
    if smc is not None and smc.ratio > 0:
        items = smc.apply(items, seed)
    name = "poisson" if burstiness == 1.0 else "gamma"
    return Workload(
        name,
        _take(items, num_requests),
        max_concurrency,
        num_requests,
        config={
            "workload": name,
            "request_rate": rate,
            "burstiness": burstiness,
            "input_len": input_len,
            "max_tokens": max_tokens,
            "seed": seed,
            "max_concurrency": max_concurrency,
            **({"smc_ratio": smc.ratio, "smc_particles": smc.particles} if smc and smc.ratio > 0 else {}),
        },
    )


def poisson_workload(rate: float, **kw) -> Workload:
    return rate_workload(rate, burstiness=1.0, **kw)


def gamma_workload(rate: float, burstiness: float, **kw) -> Workload:
    return rate_workload(rate, burstiness=burstiness, **kw)


def concurrency_workload(
    concurrency: int,
    *,
    num_requests: int | None = None,
    input_len: int = 64,
    max_tokens: int = 16,
    seed: int = 0,
    smc: SmcMix | None = None,
    temperature: float | None = None,
    ignore_eos: bool = True,
    salt: int | str = 0,
) -> Workload:
    """A closed loop: ``concurrency`` requests in flight at all times (``salt``: as in :func:`random_specs`)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    specs = random_specs(input_len, max_tokens, seed, salt=salt, temperature=temperature, ignore_eos=ignore_eos)
    items = ((0.0, s) for s in specs)
    if smc is not None and smc.ratio > 0:
        items = smc.apply(items, seed)
    return Workload(
        "concurrency",
        _take(items, num_requests),
        concurrency,
        num_requests,
        config={
            "workload": "concurrency",
            "max_concurrency": concurrency,
            "input_len": input_len,
            "max_tokens": max_tokens,
            "seed": seed,
            **({"smc_ratio": smc.ratio, "smc_particles": smc.particles} if smc and smc.ratio > 0 else {}),
        },
    )


def sweep_workloads(rates: Sequence[float], *, burstiness: float = 1.0, **kw) -> list[Workload]:
    """One rate workload per rate, run one after another: the same arrival seed and prompt lengths at
    every rate, but fresh prompts per run (salted by the rate's index) so that no run finds the previous
    run's prompts in the server's prefix cache."""
    if not rates:
        raise ValueError("a sweep needs at least one rate")
    salt = kw.pop("salt", 0)
    return [rate_workload(r, burstiness=burstiness, salt=f"{salt}:sweep{i}", **kw) for i, r in enumerate(rates)]
