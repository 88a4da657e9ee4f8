"""Inference: latent cache, batched engine, sampling, MTP speculative decoding.

Pairs that must agree: prefill + absorbed decode vs the full-sequence forward; the engine on
left-padded batches vs the argmax loop over unpadded rows; speculative vs plain greedy; recorded
experts vs the full forward's routing. Every model here shares one config and one batch shape,
so the engines compile once per variant.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

import presets
from dsjax import inference
from dsjax import sharding as shd
from dsjax.config import MeshConfig, replace
from dsjax.inference import cache as cache_lib
from dsjax.inference import engine, sampling, speculative
from dsjax.model import Transformer, compute_variables

LOGIT_TOL = 1e-4  # float32 cached decode vs full forward (max abs over all logits)
NEAR_TIE = 1e-5  # top-2 logit gap below which greedy may legitimately flip between two computations
MAX_NEAR_TIE_FRACTION = 0.01  # of all generated steps
SAMPLE_TOL = 0.03  # empirical vs exact probabilities, max abs, over SAMPLES draws
SAMPLES = 20_000
EXPERT_MATCH_MIN = 0.99  # recorded vs full-forward expert ids (router near-ties may flip)

N = 24  # new tokens
PROMPT_COLUMNS = 8
LENGTHS = np.array([5, 2, 8, 1], np.int32)  # left-padded into PROMPT_COLUMNS


def _bigram(params, tokens):
    """The oracle model's next token (numpy): argmax head(final_norm(Emb(t)))."""
    emb = np.asarray(params["embed"]["embedding"], np.float32)[tokens]
    h = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(params["final_norm"]["scale"])
    return (h @ np.asarray(params["head"]["kernel"], np.float32)).argmax(-1)


@functools.partial(jax.jit, static_argnums=0)
def _init(config, rng):
    return nn.unbox(Transformer(config).init(rng, jnp.zeros((1, 8), jnp.int32)))


@pytest.fixture(scope="module")
def setup():
    """A random tiny model with two MTP modules (init scale raised so logits are not near-uniform),
    prompts, and an EOS id that the oracle (bigram) model reaches from row 0 after 3 tokens."""
    base = replace(presets.load("tiny").model, initializer_range=0.2, **{"mtp.num_nextn_predict_layers": 2})
    variables = _init(base, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, 256, n)) for n in LENGTHS]
    oracle = speculative.oracle_draft_variables(variables)
    chain = [prompts[0][-1]]
    for _ in range(3):
        chain.append(int(_bigram(oracle["params"], chain[-1])))
    assert len(set(chain)) == 4, chain  # pick another seed if the bigram chain cycles this early
    config = dataclasses.replace(base, eos_token_id=chain[-1])
    tokens = np.zeros((len(prompts), PROMPT_COLUMNS), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, PROMPT_COLUMNS - len(p):] = p
    return dict(base=base, config=config, variables=variables, oracle=oracle, prompts=prompts, tokens=tokens,
                eos_chain=chain[1:])


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, variables, tokens_BL):
    return Transformer(config).apply(variables, tokens_BL)


@functools.partial(jax.jit, static_argnums=0)
def _full(config, variables, tokens_BL, positions_BL, segment_ids_BL):
    out = Transformer(config).apply(variables, tokens_BL, positions_BL, segment_ids_BL, return_mtp=True,
                                    full_output=True)
    return out.logits, out.mtp_logits[0], out.moe_stats.expert_ids_BTK


def _layout(prompt_tokens, completions):
    """[left-padded prompt | completion] rows with positions from 0 and segment 0 on padding."""
    b = prompt_tokens.shape[0]
    pos_BP, seg_BP, _ = engine.prompt_layout(jnp.asarray(LENGTHS), PROMPT_COLUMNS)
    pos_BN = LENGTHS[:, None] + np.arange(N)[None, :]
    tokens = np.concatenate([prompt_tokens, completions], axis=1).astype(np.int32)
    return tokens, np.concatenate([pos_BP, pos_BN], 1), np.concatenate([seg_BP, np.ones((b, N), np.int32)], 1)


def argmax_loop(config, variables, prompts, n, eos):
    """Greedy decoding the plain way: the full forward over each unpadded row, one token at a time
    (rows right-padded into one buffer, which causal attention never sees)."""
    seqs, outs, active = [list(p) for p in prompts], [[] for _ in prompts], [True] * len(prompts)
    for _ in range(n):
        buf = np.zeros((len(seqs), PROMPT_COLUMNS + n), np.int32)
        for i, s in enumerate(seqs):
            buf[i, :len(s)] = s
        logits = np.asarray(_logits(config, variables, buf))
        for i, s in enumerate(seqs):
            if active[i]:
                tok = int(logits[i, len(s) - 1].argmax())
                s.append(tok)
                outs[i].append(tok)
                active[i] = tok != eos
    return outs


def _plain(s, variables=None, **kw):
    kw = {"max_new_tokens": N, "rng": jax.random.PRNGKey(0), **kw}
    return engine.generate_tokens(s["config"], variables or s["variables"], s["tokens"], LENGTHS, **kw)


def _top2_gap(logits):
    top2 = np.sort(np.asarray(logits), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


# --------------------------------------------------------------------------------------- sampling


def test_top_k_1_is_greedy_and_top_k_limits_support():
    logits = jax.random.normal(jax.random.PRNGKey(1), (6, 50)) * 3
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(sampling.sample(logits, key, temperature=1.0, top_k=1), sampling.greedy(logits))
    keys = jax.random.split(jax.random.PRNGKey(2), SAMPLES)
    draws = jax.vmap(lambda k: sampling.sample(logits[:1], k, temperature=1.0, top_k=3))(keys)[:, 0]
    top3 = np.argsort(-np.asarray(logits[0]))[:3]
    expected = np.asarray(jax.nn.softmax(logits[0, top3]))
    freq = np.array([(np.asarray(draws) == t).mean() for t in top3])
    assert freq.sum() == 1.0
    np.testing.assert_allclose(freq, expected, atol=SAMPLE_TOL)


@pytest.mark.parametrize("top_p, kept", [(0.5, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    filtered = np.asarray(sampling.filter_logits(logits, temperature=1.0, top_p=top_p))[0]
    assert list(np.flatnonzero(np.isfinite(filtered))) == kept
    keys = jax.random.split(jax.random.PRNGKey(3), SAMPLES)
    draws = np.asarray(jax.vmap(lambda k: sampling.sample(logits, k, temperature=1.0, top_p=top_p))(keys)[:, 0])
    probs = np.asarray([0.5, 0.3, 0.15, 0.05])[kept]
    np.testing.assert_allclose([(draws == t).mean() for t in kept], probs / probs.sum(), atol=SAMPLE_TOL)


def test_temperature_scales_the_distribution():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    keys = jax.random.split(jax.random.PRNGKey(4), SAMPLES)
    for t in (0.5, 2.0):
        draws = np.asarray(jax.vmap(lambda k: sampling.sample(logits, k, temperature=t))(keys)[:, 0])
        np.testing.assert_allclose([(draws == i).mean() for i in range(4)], jax.nn.softmax(logits[0] / t),
                                   atol=SAMPLE_TOL)


def test_speculative_acceptance_preserves_the_target_distribution():
    """Draft d accepted with p(d), else resampled from p without d: emitted token 0 ~ p exactly."""
    logits = jax.random.normal(jax.random.PRNGKey(5), (1, 3, 6)) * 1.5  # [B, D+1, V], D = 2
    drafts = jnp.asarray([[int(jnp.argsort(logits[0, 0])[-2]), 0]], jnp.int32)  # not the mode
    sampler = engine.Sampler(temperature=1.0)
    keys = jax.random.split(jax.random.PRNGKey(6), SAMPLES)
    a, emitted = jax.vmap(lambda k: speculative.accept(logits, drafts, k, sampler))(keys)
    first = np.asarray(emitted[:, 0, 0])
    np.testing.assert_allclose([(first == v).mean() for v in range(6)], jax.nn.softmax(logits[0, 0]),
                               atol=SAMPLE_TOL)
    assert (first[np.asarray(a[:, 0]) >= 1] == int(drafts[0, 0])).all()
    greedy_a, greedy_tokens = speculative.accept(logits, jnp.argmax(logits[:, :2], -1), None, engine.Sampler())
    assert int(greedy_a[0]) == 2 and (np.asarray(greedy_tokens) == np.asarray(jnp.argmax(logits, -1))).all()


# ------------------------------------------------------------------------------------------ cache


def test_cache_holds_latent_plus_rope_key_per_token_per_layer():
    v3 = presets.load("deepseek_v3").model
    assert cache_lib.values_per_token_per_layer(v3) == 576 == v3.mla.kv_lora_rank + v3.mla.qk_rope_head_dim
    assert cache_lib.bytes_per_token_per_layer(v3) == 576 * 2  # bf16
    abstract = jax.eval_shape(lambda: cache_lib.init_cache(v3, 2, 16))
    assert abstract.dense.c_kv_BSC.shape == (3, 2, 16, 512) and abstract.dense.k_rope_BSR.shape == (3, 2, 16, 64)
    assert abstract.moe.c_kv_BSC.shape == (58, 2, 16, 512) and len(abstract.mtp) == 1
    assert abstract.mtp[0].c_kv_BSC.shape == (2, 16, 512) and abstract.mtp[0].c_kv_BSC.dtype == jnp.bfloat16
    assert cache_lib.cache_bytes(v3, 2, 16) == 2 * 16 * 62 * 576 * 2
    tiny = presets.load("tiny").model
    assert cache_lib.values_per_token_per_layer(tiny) == 32 + 8


def test_cache_is_sharded_over_the_batch_axes():
    mesh = shd.make_mesh(MeshConfig(data=4, expert=2, tensor=1))
    config = presets.load("tiny").model
    with jax.set_mesh(mesh), shd.activation_rules():
        cache = jax.jit(lambda: cache_lib.init_cache(config, 8, 16))()
    assert cache.moe.c_kv_BSC.sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "expert"))), 4)
    assert cache.mtp[0].k_rope_BSR.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "expert"))), 3)
    expected = cache_lib.shardings(config, 8, 16, mesh)
    for leaf, sharding in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


# ----------------------------------------------------------------------------------------- engine


def test_batch_sharded_over_a_mesh_equals_one_device(setup):
    s = setup
    mesh = shd.make_mesh(MeshConfig(data=4, expert=2, tensor=1))
    with jax.set_mesh(mesh):
        variables = jax.device_put(s["variables"], shd.replicated(mesh))
        sharded = engine.generate_tokens(s["config"], variables, np.concatenate([s["tokens"]] * 2),
                                         np.concatenate([LENGTHS] * 2), max_new_tokens=N, rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(sharded.tokens, np.concatenate([_plain(s).tokens] * 2))


def test_prefill_and_absorbed_decode_match_the_full_forward(setup):
    s = setup
    config, variables = s["config"], s["variables"]
    completions = np.random.RandomState(1).randint(0, config.vocab_size, (len(LENGTHS), N)).astype(np.int32)
    tokens, positions, segments = _layout(s["tokens"], completions)
    full_logits = np.asarray(_full(config, variables, tokens, positions, segments)[0])

    prefill = jax.jit(lambda v, t, n, c: engine.prefill(config, v, t, n, c))
    decode = jax.jit(lambda v, st, t: engine.decode(config, v, st, t))
    cache = cache_lib.init_cache(config, len(LENGTHS), PROMPT_COLUMNS + N, mtp=False)
    out, state = prefill(variables, s["tokens"], LENGTHS, cache)
    real = np.asarray(segments[:, :PROMPT_COLUMNS], bool)
    assert np.abs(np.asarray(out.logits)[real] - full_logits[:, :PROMPT_COLUMNS][real]).max() <= LOGIT_TOL
    worst = 0.0
    for i in range(N):
        out, state = decode(variables, state, completions[:, i:i + 1])
        worst = max(worst, np.abs(np.asarray(out.logits[:, 0]) - full_logits[:, PROMPT_COLUMNS + i]).max())
    print(f"max |cached - full| logit difference over {N} decode steps: {worst:.2e}")
    assert worst <= LOGIT_TOL


def test_generate_equals_the_argmax_loop_and_stops_at_eos(setup):
    s = setup
    config = s["config"]
    for variables in (s["variables"], s["oracle"]):
        expected = argmax_loop(config, variables, s["prompts"], N, config.eos_token_id)
        assert inference.generate(config, variables, s["prompts"], max_new_tokens=N) == expected
        assert inference.generate(config, variables, s["prompts"], max_new_tokens=N, speculative=True) == expected
    # the oracle reaches EOS from row 0 after 3 tokens: the row stops there, EOS included
    assert expected[0] == s["eos_chain"] and expected[0][-1] == config.eos_token_id
    result = _plain(s, s["oracle"], eos_id=config.eos_token_id, pad_id=7)
    assert int(result.lengths[0]) == 3 and (np.asarray(result.tokens[0, 3:]) == 7).all()
    assert [len(e) for e in expected] == list(np.asarray(result.lengths))
    sampled = inference.generate(config, s["variables"], s["prompts"], max_new_tokens=N, temperature=1.0, top_k=1,
                                 seed=3)
    assert sampled == inference.generate(config, s["variables"], s["prompts"], max_new_tokens=N)


def test_speculative_greedy_equals_plain_greedy(setup):
    """Token for token, except where the plain run's top-2 logits nearly tie (counted, <= 1%)."""
    s = setup
    config = s["config"]
    for seed in (0, 1):
        variables = s["variables"] if seed == 0 else _init(s["base"], jax.random.PRNGKey(seed))
        plain = _plain(s, variables)
        tokens, positions, segments = _layout(s["tokens"], np.asarray(plain.tokens))
        gaps = _top2_gap(_full(config, variables, tokens, positions, segments)[0][:, PROMPT_COLUMNS - 1:-1])
        near = gaps < NEAR_TIE
        print(f"seed {seed}: {near.sum()} near-tie steps of {near.size}")
        assert near.mean() <= MAX_NEAR_TIE_FRACTION
        for depth in (1, 2):
            spec = speculative.generate_tokens(config, variables, s["tokens"], LENGTHS, max_new_tokens=N,
                                               rng=jax.random.PRNGKey(0), depth=depth)
            got, want = np.asarray(spec.tokens), np.asarray(plain.tokens)
            for row in range(len(LENGTHS)):
                diff = np.flatnonzero(got[row] != want[row])
                assert diff.size == 0 or near[row, diff[0]], (seed, depth, row, got[row], want[row])
            print(f"seed {seed} depth {depth}: acceptance {engine.acceptance_rate(spec):.2%} "
                  f"({int(spec.steps)} verify cycles for {N} tokens)")


def test_oracle_mtp_drafts_are_always_accepted(setup):
    s = setup
    plain = _plain(s, s["oracle"])
    for depth in (1, 2):
        spec = speculative.generate_tokens(s["config"], s["oracle"], s["tokens"], LENGTHS, max_new_tokens=N,
                                           rng=jax.random.PRNGKey(0), depth=depth)
        np.testing.assert_array_equal(spec.tokens, plain.tokens)
        assert engine.acceptance_rate(spec) == 1.0
        assert int(spec.steps) == -(-(N - 1) // (depth + 1))  # D + 1 tokens per verify


def test_mtp_cache_rollback_keeps_depth_1_drafts_exact(setup):
    """After every cycle, the depth-1 draft equals the full-sequence MTP forward's argmax at the
    same position: the MTP cache holds exactly the accepted positions (holes masked)."""
    s = setup
    config, variables = s["config"], s["variables"]
    kw = dict(max_new_tokens=N, sampler=engine.Sampler())
    eos = jnp.int32(-1)
    start = jax.jit(functools.partial(speculative.start, config, depth=1, **kw))
    advance = jax.jit(functools.partial(speculative.advance, config, **kw))
    rng = jax.random.PRNGKey(0)
    loop = start(variables, s["tokens"], LENGTHS, rng, eos)
    drafts = []  # (row, position of the draft's input token, draft) while the row is active
    while not bool(loop.done_B.all()):
        for row in np.flatnonzero(~np.asarray(loop.done_B)):
            drafts.append((row, int(loop.state.next_position_B[row]) - 1, int(loop.drafts_BD[row, 0])))
        loop = advance(variables, loop, rng, eos, loop.step + 1)
    completions = np.asarray(speculative.finish(loop, N, 0).tokens)
    np.testing.assert_array_equal(completions, _plain(s).tokens)
    tokens, positions, segments = _layout(s["tokens"], completions)
    mtp_logits = np.asarray(_full(config, variables, tokens, positions, segments)[1])
    checked = 0
    for row, position, draft in drafts:
        column = PROMPT_COLUMNS - LENGTHS[row] + position
        if column + 2 >= tokens.shape[1] or _top2_gap(mtp_logits[row, column]) < NEAR_TIE:
            continue
        assert draft == mtp_logits[row, column].argmax(), (row, position)
        checked += 1
    assert checked >= len(drafts) // 2, (checked, len(drafts))


def test_decode_step_compiles_once_and_records_experts(setup, monkeypatch):
    s = setup
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return step(*args, **kwargs)

    step = chex.assert_max_traces(engine.decode_step, n=1)
    monkeypatch.setattr(engine, "decode_step", counted)
    first = _plain(s, record_experts=True)
    other = np.random.RandomState(2).randint(0, 256, s["tokens"].shape).astype(np.int32)
    engine.generate_tokens(s["config"], s["variables"], other, LENGTHS[::-1].copy(), max_new_tokens=N,
                           rng=jax.random.PRNGKey(9), record_experts=True, eos_id=3)
    assert len(traces) == 1

    config = s["config"]
    replay = first.replay
    assert replay.mtp == () and replay.moe.shape == (config.num_moe_layers, len(LENGTHS), PROMPT_COLUMNS + N,
                                                     config.moe.num_experts_per_tok)
    tokens, positions, segments = _layout(s["tokens"], np.asarray(first.tokens))
    full_ids = np.asarray(_full(config, s["variables"], tokens, positions, segments)[2])
    real = np.broadcast_to(segments.astype(bool)[None], full_ids.shape[:3])
    match = (np.sort(full_ids, -1) == np.sort(np.asarray(replay.moe), -1)).all(-1)[real].mean()
    print(f"recorded expert ids equal the full forward's at {match:.2%} of (layer, token) pairs")
    assert match >= EXPERT_MATCH_MIN


def _while_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _while_bodies(sub)


@pytest.mark.parametrize("speculative_loop", [False, True])
def test_decode_loops_read_weights_in_the_compute_dtype(setup, speculative_loop):
    """float32 master weights with bf16 compute: the outer decode loop (plain and speculative) must
    close over bf16 weights only, cast once before it; a cast inside the body would re-read the
    float32 weights every step (the model's per-layer scans are nested inside the body)."""
    s = setup
    config = replace(s["config"], dtype="bfloat16")
    args = (config, s["variables"], jnp.asarray(s["tokens"]), jnp.asarray(LENGTHS), jax.random.PRNGKey(0),
            *engine.special_ids(None, None))
    if speculative_loop:
        fn = functools.partial(speculative._generate, max_new_tokens=N, sampler=engine.Sampler(), depth=2)
    else:
        fn = functools.partial(engine._generate, max_new_tokens=N, sampler=engine.Sampler(), record_experts=False)
    jaxpr = jax.make_jaxpr(fn, static_argnums=0)(*args)
    loop = next(_while_bodies(jaxpr.jaxpr))  # the outermost: the decode loop
    n_consts = loop.params["body_nconsts"]
    weights = [v.aval for v in loop.invars[loop.params["cond_nconsts"]:][:n_consts] if v.aval.ndim >= 2]
    assert weights, "the decode loop closes over no weights"
    islands = compute_variables(config, s["variables"])  # router kernels, norm scales, router bias
    float32_shapes = {x.shape for x in jax.tree_util.tree_leaves(islands) if x.dtype == jnp.float32}
    assert len(float32_shapes) < len(jax.tree_util.tree_leaves(islands)) // 4  # most weights are cast
    wide = [a for a in weights
            if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize > 2 and a.shape not in float32_shapes]
    assert not wide, f"the decode loop reads {len(wide)} float32 weights per step, e.g. {wide[:3]}"
