"""Petals habits: its README snippets run with only the import and the peers changed, the client is a
torch module, and ``COROLLA_INITIAL_PEERS`` is where ``from_pretrained`` finds the swarm.

The snippets below are Petals' own usage examples, kept as text and run with ``exec`` after a few
substitutions that each must apply (the import, the model name, the peers; ``.cuda()`` becomes
``.to("cpu")`` on a machine without CUDA; the chat's endless reply loop gets a bound).
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from swarm_helpers import client, hf_greedy, hf_model, max_diff, random_ids, running_swarm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.client.sampling import SamplingParams, next_tokens

pytestmark = pytest.mark.swarm

SPANS = ["0:3", "3:6"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Petals' README (2024): the one-shot example.
README_ONE_SHOT = """\
from transformers import AutoTokenizer
from petals import AutoDistributedModelForCausalLM

# Choose any model available at https://health.petals.dev
model_name = "meta-llama/Meta-Llama-3.1-405B-Instruct"

# Connect to a distributed network hosting model layers
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoDistributedModelForCausalLM.from_pretrained(model_name)

# Run the model as if it were on your computer
inputs = tokenizer("A cat sat", return_tensors="pt")["input_ids"]
outputs = model.generate(inputs, max_new_tokens=5)
print(tokenizer.decode(outputs[0]))  # A cat sat on a mat...
"""

# Petals' earlier README: the same on a GPU.
README_CAT_IN_FRENCH = """\
from transformers import AutoTokenizer
from petals import AutoDistributedModelForCausalLM

model_name = "bigscience/bloom-7b1-petals"
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoDistributedModelForCausalLM.from_pretrained(model_name)
model = model.cuda()
inputs = tokenizer('A cat in French is "', return_tensors="pt")["input_ids"].cuda()
outputs = model.generate(inputs, max_new_tokens=3)
print(tokenizer.decode(outputs[0]))  # A cat in French is "chat"
"""

# Petals' README / getting-started notebook: the interactive chat in one inference session.
README_CHAT = """\
from transformers import AutoTokenizer
from petals import AutoDistributedModelForCausalLM

model_name = "petals-team/StableBeluga2"
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoDistributedModelForCausalLM.from_pretrained(model_name)
model = model.cuda()

fake_token = tokenizer("^")["input_ids"][0]  # Workaround to make tokenizer.decode() keep leading spaces

with model.inference_session(max_length=512) as sess:
    while True:
        prompt = input('Human: ')
        if prompt == "":
            break
        prefix = f"Human: {prompt}\\nFriendly AI:"
        prefix = tokenizer(prefix, return_tensors="pt")["input_ids"].cuda()
        print("Friendly AI:", end="", flush=True)

        while True:
            outputs = model.generate(prefix, max_new_tokens=1, session=sess,
                                     do_sample=True, temperature=0.9, top_p=0.6)
            outputs = tokenizer.decode([fake_token, outputs[0, -1].item()])[1:]

            # Now, let's print one new token at a time
            print(outputs, end="", flush=True)

            if "\\n" in outputs or "</s>" in outputs:
                break
            prefix = None  # Prefix was passed only for the 1st token of the bot's response
"""

CHAT_PROMPTS = ["Hi there", "What is a cat?", "Bye", ""]  # "" ends the chat, as in the snippet
REPLY_BOUND = 10  # tokens per reply: the bound that replaces the reply loop's `while True`


@dataclass
class PetalsSwarm:
    path: Path
    swarm: Swarm
    hf: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    peers: str  # the swarm's multiaddrs, as COROLLA_INITIAL_PEERS holds them


@pytest.fixture(scope="module")
def petals(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PetalsSwarm]:
    """The tiny llama on two server processes (blocks 0:3 and 3:6)."""
    path = tiny_checkpoint("llama")
    with running_swarm(path, SPANS, tmp_path_factory) as swarm:
        yield PetalsSwarm(
            path, swarm, hf_model(path), AutoTokenizer.from_pretrained(path), " ".join(swarm.initial_peers)
        )


def replace(code: str, old: str, new: str) -> str:
    """``code`` with ``old`` replaced, failing if the snippet has no ``old`` (so every change is known)."""
    assert old in code, f"snippet has no {old!r}"
    return code.replace(old, new)


def adapt(snippet: str, path: Path, *, peers_in_code: bool, reply_bound: int | None = None) -> str:
    """Petals' snippet with only the import, the model, the peers (and the chat's bound) changed."""
    code = replace(snippet, "from petals import", "from corolla.engine import")
    code, n = re.subn(r'^model_name = ".*"$', f"model_name = {str(path)!r}", code, flags=re.M)
    assert n == 1
    if peers_in_code:  # else the peers come from COROLLA_INITIAL_PEERS and this line stays as it is
        model_line = "AutoDistributedModelForCausalLM.from_pretrained(model_name)"
        code = replace(code, model_line, model_line.replace("model_name)", "model_name, initial_peers=PEERS)"))
    if DEVICE == "cpu" and ".cuda()" in code:
        code = replace(code, ".cuda()", '.to("cpu")')
    if reply_bound is not None:
        code = replace(code, "        while True:\n", f"        for _ in range({reply_bound}):\n")
    return code


@contextlib.contextmanager
def run_snippet(code: str, peers: str, inputs: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Execute an adapted snippet; yield its globals; close the model it made (the snippets never do)."""
    answers = iter(inputs or [])
    namespace: dict[str, Any] = {"__name__": "petals_snippet", "PEERS": peers.split(), "input": lambda _: next(answers)}
    try:
        exec(compile(code, "<petals snippet>", "exec"), namespace)
        yield namespace
    finally:
        model = namespace.get("model")
        if isinstance(model, DistributedModelForCausalLM):
            model.close()


# ---- the one-shot snippets -------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("snippet", [README_ONE_SHOT, README_CAT_IN_FRENCH], ids=["a-cat-sat", "cat-in-french"])
@pytest.mark.parametrize("peers_in_code", [False, True], ids=["peers-from-env", "peers-in-code"])
def test_one_shot_snippet_matches_transformers(
    petals: PetalsSwarm,
    snippet: str,
    peers_in_code: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if peers_in_code:  # an argument wins over the environment: a wrong env value must not matter
        monkeypatch.setenv("COROLLA_INITIAL_PEERS", "/ip4/127.0.0.1/tcp/9/p2p/QmNobodyListensHere")
    else:
        monkeypatch.setenv("COROLLA_INITIAL_PEERS", petals.peers)
    code = adapt(snippet, petals.path, peers_in_code=peers_in_code)
    with run_snippet(code, petals.peers) as ns:
        expected = hf_greedy(petals.hf, ns["inputs"].cpu(), ns["outputs"].shape[1] - ns["inputs"].shape[1])
        assert ns["outputs"].device == ns["inputs"].device
        assert torch.equal(ns["outputs"].cpu(), expected)  # token for token
        assert ns["outputs"].shape[1] - ns["inputs"].shape[1] == (5 if snippet is README_ONE_SHOT else 3)
        assert capsys.readouterr().out == str(petals.tokenizer.decode(expected[0])) + "\n"


# ---- the interactive chat ----------------------------------------------------------------------------


@torch.inference_mode()
def reference_chat(petals: PetalsSwarm, seed: int) -> tuple[str, int]:
    """The chat computed locally with transformers' full forward and the same sampling, from ``seed``.

    Returns the printed transcript and how many tokens the conversation holds at the end.
    """
    torch.manual_seed(seed)
    tok = petals.tokenizer
    params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.6)
    fake_token = tok("^")["input_ids"][0]
    ids = torch.zeros((1, 0), dtype=torch.long)
    printed: list[str] = []
    for prompt in CHAT_PROMPTS:
        if prompt == "":
            break
        ids = torch.cat([ids, tok(f"Human: {prompt}\nFriendly AI:", return_tensors="pt")["input_ids"]], dim=1)
        printed.append("Friendly AI:")
        for _ in range(REPLY_BOUND):
            token = next_tokens(petals.hf(ids).logits[:, -1].float(), ids, params)
            ids = torch.cat([ids, token[:, None]], dim=1)
            piece = str(tok.decode([fake_token, int(token[0])]))[1:]
            printed.append(piece)
            if "\n" in piece or "</s>" in piece:
                break
    return "".join(printed), int(ids.shape[1])


def run_chat(petals: PetalsSwarm, seed: int, capsys: pytest.CaptureFixture[str]) -> tuple[str, Any]:
    """Run the chat snippet once from ``seed``; return its transcript and its (closed) session."""
    code = adapt(README_CHAT, petals.path, peers_in_code=True, reply_bound=REPLY_BOUND)
    capsys.readouterr()
    torch.manual_seed(seed)
    with run_snippet(code, petals.peers, CHAT_PROMPTS) as ns:
        return capsys.readouterr().out, ns["sess"]


@pytest.mark.timeout(300)
def test_chat_snippet_samples_like_a_local_model_and_repeats_with_a_seed(
    petals: PetalsSwarm, capsys: pytest.CaptureFixture[str]
) -> None:
    expected, total_tokens = reference_chat(petals, seed=0)
    first, session = run_chat(petals, 0, capsys)
    assert first == expected
    assert first.count("Friendly AI:") == len(CHAT_PROMPTS) - 1  # every turn answered, then "" stopped the chat
    assert session.closed
    assert session.position == total_tokens - 1  # everything but the last sampled token reached the servers
    assert session.token_ids.shape == (1, total_tokens - 1)
    assert int(session.token_ids.min()) >= 0 and int(session.token_ids.max()) < petals.hf.config.vocab_size
    second, _ = run_chat(petals, 0, capsys)
    assert second == first  # same seed, same conversation
    other, _ = run_chat(petals, 1, capsys)
    assert other != first  # the sampling really samples
    assert other == reference_chat(petals, seed=1)[0]


# ---- the client as a torch module --------------------------------------------------------------------


@pytest.fixture
def model(petals: PetalsSwarm) -> Iterator[DistributedModelForCausalLM]:
    with client(petals.path, petals.swarm) as m:
        yield m


@pytest.mark.timeout(120)
def test_parameters_are_the_local_embeddings_norm_and_head(model: DistributedModelForCausalLM) -> None:
    names = {name for name, _ in model.named_parameters()}
    assert names == {"head.embed_tokens.weight", "head.norm.weight", "head.lm_head.weight"}
    assert set(model.state_dict()) == names
    hidden = int(model.config.hidden_size)
    vocab = int(model.config.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == 2 * vocab * hidden + hidden


@pytest.mark.timeout(120)
def test_to_eval_train_return_the_model_and_keep_it_working(
    petals: PetalsSwarm, model: DistributedModelForCausalLM
) -> None:
    ids = random_ids(1, 6, seed=3)
    expected = hf_greedy(petals.hf, ids, 4, eos=False)
    assert model.to("cpu") is model and model.device == torch.device("cpu")
    assert model.eval() is model and not model.training and not model.head.training
    assert model.train() is model and model.training and model.head.training
    assert model.to(torch.float64) is model and model.dtype == torch.float64  # float64 is not a wire dtype
    assert torch.equal(model.generate(ids, max_new_tokens=4, eos_token_id=[]), expected)
    assert model.to(torch.float32).dtype == torch.float32
    assert model.to(DEVICE) is model and model.device.type == DEVICE
    out = model.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert out.device == ids.device and torch.equal(out, expected)  # CPU ids in, CPU ids out
    out = model.generate(ids.to(DEVICE), max_new_tokens=4, eos_token_id=[])
    assert out.device.type == DEVICE and torch.equal(out.cpu(), expected)


@pytest.mark.timeout(120)
def test_cuda_moves_the_model_or_raises_torchs_own_error(model: DistributedModelForCausalLM) -> None:
    if torch.cuda.is_available():
        assert model.cuda() is model and model.device.type == "cuda"
        return
    with pytest.raises((AssertionError, RuntimeError), match=r"(?i)cuda|nvidia"):  # torch's error, no AttributeError
        model.cuda()
    assert model.device == torch.device("cpu")


@pytest.mark.timeout(120)
def test_call_returns_transformers_style_logits(petals: PetalsSwarm, model: DistributedModelForCausalLM) -> None:
    ids = random_ids(2, 7, seed=4)
    out = model(ids)
    with torch.no_grad():
        assert max_diff(out.logits, petals.hf(ids).logits.float()) <= 1e-4
    assert torch.equal(out[0], out.logits)  # indexable like a transformers ModelOutput
    assert out.logits.device == ids.device
    with torch.no_grad():
        reference = petals.hf(ids).logits.float()
    model.to(torch.bfloat16)  # a wire dtype: hidden states travel as bfloat16, logits still come back float32
    low = model(ids).logits
    assert low.dtype == torch.float32
    assert 0 < max_diff(low, reference) <= 0.05 * float(reference.abs().max())
    model.to(torch.float32)
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=torch.tensor([[1] * 7, [0] + [1] * 6]))
    out = model(ids, labels=ids)  # the weights went through bfloat16 above: compare with its own logits
    expected = petals.hf.loss_function(logits=out.logits, labels=ids, vocab_size=petals.hf.config.vocab_size)
    assert abs(float(out.loss) - float(expected)) <= 1e-5  # transformers' shifted loss
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(ids[0])


@pytest.mark.timeout(120)
def test_generate_inside_a_with_session_continues_it(petals: PetalsSwarm, model: DistributedModelForCausalLM) -> None:
    ids = random_ids(1, 5, seed=5)
    with model.inference_session(max_length=32) as session:
        assert model.active_session is session
        first = model.generate(ids, max_new_tokens=3, eos_token_id=[])  # no session=: the active one
        more = model.generate(None, max_new_tokens=3, eos_token_id=[])  # Petals: continue from the last token
        assert session.position == ids.shape[1] + 5
    assert model.active_session is None
    assert more.shape == (1, 3)
    assert torch.equal(torch.cat([first, more], dim=1), hf_greedy(petals.hf, ids, 6, eos=False))


@pytest.mark.timeout(120)
def test_close_and_the_finalizer_still_release_the_swarm(petals: PetalsSwarm) -> None:
    closed = client(petals.path, petals.swarm)
    finalizer = closed._finalizer
    assert finalizer.alive
    closed.close()
    assert not finalizer.alive
    closed.close()  # idempotent

    dropped = client(petals.path, petals.swarm)
    finalizer = dropped._finalizer
    del dropped
    gc.collect()
    assert not finalizer.alive  # a model nobody closes still leaves the swarm when it is collected
