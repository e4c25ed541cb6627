"""A battery of bad inputs through every entry point: the config, the wrapping, the layers and
chains, the forward, the merges, saving and loading, the raw ops and the C++ core (rules, merges,
modules). Each case asserts the whole first line of its message: it names the argument, what was
expected and what was received. Legal inputs that are likely mistakes give the warning shown."""

import os
import shutil
import tempfile

import pytest
import torch
from torch import nn

import reslora
from reslora import _C

from hf_models import batch, make
from seeds import S

ops = torch.ops.reslora
C = reslora.ResLoRAConfig
TMP = tempfile.mkdtemp(prefix="reslora-bad-input-")


@pytest.fixture(scope="module", autouse=True)
def _remove_tmp():
    yield
    shutil.rmtree(TMP, ignore_errors=True)


def lin(**kw):
    return reslora.ResLoRALinear(nn.Linear(4, 3), r=2, **kw)


def seq(n=2, **kw):
    kw.setdefault("r", 2)
    return reslora.get_reslora_model(
        nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)]), C(target_modules=[str(i) for i in range(n)], **kw)
    )


def peft_model(kind):
    import peft

    if kind == "ia3":
        return peft.get_peft_model(make("llama"), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    model = peft.get_peft_model(make("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    return model


def unloaded():
    model = seq(variant="is")
    model.unload()
    assert model.chains == {}  # the chains went with the blocks
    return model


def llama(**kw):
    return reslora.get_reslora_model(make("llama"), C(r=2, **kw))


def saved(sub, **kw):
    d = os.path.join(TMP, sub)
    seq(**kw).save_pretrained(d)
    return d


x, W = torch.randn(3, 4), torch.randn(5, 4)
A, B = torch.randn(2, 4), torch.randn(5, 2)
z = torch.randn(3, 2)
XM = [torch.tensor(1.0), torch.tensor(1.0)]


def merge2(merge, weights=(None, None), As=(A, A), Bs=(B, B), means=(None, None), variant="is", **kw):
    """The C++ core's merge of a two-block chain (pre_num 1, scaling 1)."""
    return _C.merge_chain(list(weights), list(As), list(Bs), list(means), list(means), variant, merge, 1, 1.0, **kw)


FIT = dict(xx=[torch.eye(4), torch.eye(4)], zx=[None, torch.zeros(2, 4)], tokens=[10, 10])


# One row per case: (id, call, error or warning type, the whole first line of its message)
# fmt: off
CASES = [
    # config
    ('config: variant None', lambda: C(variant=None), ValueError,
     "reslora: variant must be one of 'lora', 'is', 'bs', 'ms', got None"),
    ('config: variant int', lambda: C(variant=1), ValueError,
     "reslora: variant must be one of 'lora', 'is', 'bs', 'ms', got 1"),
    ('config: r 0', lambda: C(r=0), ValueError,
     'reslora: r must be an int >= 1, got 0'),
    ('config: r -1', lambda: C(r=-1), ValueError,
     'reslora: r must be an int >= 1, got -1'),
    ('config: r str', lambda: C(r="8"), ValueError,
     "reslora: r must be an int >= 1, got '8'"),
    ('config: r None', lambda: C(r=None), ValueError,
     'reslora: r must be an int >= 1, got None'),
    ('config: alpha 0', lambda: C(lora_alpha=0), ValueError,
     'reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got 0.0'),
    ('config: alpha -1', lambda: C(lora_alpha=-1), ValueError,
     'reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got -1.0'),
    ('config: alpha str', lambda: C(lora_alpha="16"), ValueError,
     "reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got '16'"),
    ('config: alpha nan', lambda: C(lora_alpha=float("nan")), ValueError,
     'reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got nan'),
    ('config: alpha bool', lambda: C(lora_alpha=True), ValueError,
     'reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got True'),
    ('config: dropout 1', lambda: C(lora_dropout=1.0), ValueError,
     "reslora: lora_dropout must be a number in [0, 1) that keeps at least 2^-15 of the inputs (the mask's resolution), got 1.0"),
    ('config: dropout neg', lambda: C(lora_dropout=-0.1), ValueError,
     "reslora: lora_dropout must be a number in [0, 1) that keeps at least 2^-15 of the inputs (the mask's resolution), got -0.1"),
    ('config: dropout nan', lambda: C(lora_dropout=float("nan")), ValueError,
     "reslora: lora_dropout must be a number in [0, 1) that keeps at least 2^-15 of the inputs (the mask's resolution), got nan"),
    ('config: dropout None', lambda: C(lora_dropout=None), ValueError,
     "reslora: lora_dropout must be a number in [0, 1) that keeps at least 2^-15 of the inputs (the mask's resolution), got None"),
    ('config: pre_num float', lambda: C(pre_num=1.5), ValueError,
     'reslora: pre_num must be -1 (all) or an int >= 0, got 1.5'),
    ('config: pre_num str', lambda: C(pre_num="1"), ValueError,
     "reslora: pre_num must be -1 (all) or an int >= 0, got '1'"),
    ('config: pre_num bool', lambda: C(pre_num=True), ValueError,
     'reslora: pre_num must be -1 (all) or an int >= 0, got True'),
    ('config: stats_window 0', lambda: C(stats_window=0), ValueError,
     'reslora: stats_window must be an int >= 1, got 0'),
    ('config: stats_window float', lambda: C(stats_window=1.5), ValueError,
     'reslora: stats_window must be an int >= 1, got 1.5'),
    ('config: merge exact is', lambda: C(merge="exact"), ValueError,
     "reslora: merge 'exact' does not apply to variant 'is'; expected one of 'input', 'weight', 'fit'"),
    ('config: merge weight bs', lambda: C(variant="bs", merge="weight"), ValueError,
     "reslora: merge 'weight' does not apply to variant 'bs'; expected one of 'exact'"),
    ('config: merge fit lora', lambda: C(variant="lora", merge="fit"), ValueError,
     "reslora: merge 'fit' does not apply to variant 'lora'; expected one of 'exact'"),
    ('config: merge mid is', lambda: C(merge="mid"), ValueError,
     "reslora: merge 'mid' does not apply to variant 'is'; expected one of 'input', 'weight', 'fit'"),
    ('config: merge empty', lambda: C(merge=""), ValueError,
     "reslora: merge must be one of 'exact', 'input', 'weight', 'mid', 'fit', got ''"),
    ('config: tm empty str', lambda: C(target_modules=""), ValueError,
     "reslora: target_modules must be a non-empty list of names, a regex string or 'all-linear', got the empty string"),
    ("config: tm ['']", lambda: C(target_modules=[""]), ValueError,
     "reslora: target_modules must be a non-empty list of names, a regex string or 'all-linear', got ['']"),
    ('config: tm dict', lambda: C(target_modules={"q": 1}), ValueError,
     "reslora: target_modules must be a non-empty list of names, a regex string or 'all-linear', got {'q': 1}"),
    ('config: ex int', lambda: C(exclude_modules=5), ValueError,
     'reslora: exclude_modules must be a non-empty list of names, a regex string, got 5'),
    ('config: ex bad regex', lambda: C(exclude_modules="(bad"), ValueError,
     "reslora: exclude_modules must be a non-empty list of names, a regex string; got the string '(bad', which is not a valid regular expression (missing ), unterminated subpattern at position 0)"),
    ('config: mts str', lambda: C(modules_to_save="score"), ValueError,
     "reslora: modules_to_save must be None or a non-empty list of module names, got 'score'"),
    ('config: mts empty', lambda: C(modules_to_save=[]), ValueError,
     'reslora: modules_to_save must be None or a non-empty list of module names, got []'),
    ('config: mts int', lambda: C(modules_to_save=[1]), ValueError,
     'reslora: modules_to_save must be None or a non-empty list of module names, got [1]'),
    ('config: lt -1', lambda: C(target_modules=["q_proj"], layers_to_transform=-1), ValueError,
     'reslora: layers_to_transform must be a layer index >= 0 or a non-empty list of them, got -1'),
    ('config: lt empty', lambda: C(target_modules=["q_proj"], layers_to_transform=[]), ValueError,
     'reslora: layers_to_transform must be a layer index >= 0 or a non-empty list of them, got []'),
    ('config: lt str', lambda: C(target_modules=["q_proj"], layers_to_transform=[0, "1"]), ValueError,
     "reslora: layers_to_transform must be a layer index >= 0 or a non-empty list of them, got [0, '1']"),
    ('config: lt bool', lambda: C(target_modules=["q_proj"], layers_to_transform=True), ValueError,
     'reslora: layers_to_transform must be a layer index >= 0 or a non-empty list of them, got True'),
    ('config: lt regex', lambda: C(target_modules="q_proj", layers_to_transform=[0]), ValueError,
     "reslora: layers_to_transform needs target_modules as a list of names, got the string 'q_proj' (write the layers into the regex instead)"),
    ('config: lp no lt', lambda: C(target_modules=["q_proj"], layers_pattern="layers"), ValueError,
     "reslora: layers_pattern 'layers' needs layers_to_transform, got None"),
    ('config: lp empty', lambda: C(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=[]), ValueError,
     'reslora: layers_pattern must be a name or a non-empty list of names, got []'),
    ('config: lp int', lambda: C(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=5), ValueError,
     'reslora: layers_pattern must be a name or a non-empty list of names, got 5'),
    ('config: rp list', lambda: C(rank_pattern=[]), ValueError,
     'reslora: rank_pattern must be a dict of module-name patterns to a rank (int >= 1), got []'),
    ('config: rp 0', lambda: C(rank_pattern={"q": 0}), ValueError,
     "reslora: rank_pattern['q'] must be a rank (int >= 1), got 0"),
    ('config: rp float', lambda: C(rank_pattern={"q": 2.5}), ValueError,
     "reslora: rank_pattern['q'] must be a rank (int >= 1), got 2.5"),
    ('config: rp key int', lambda: C(rank_pattern={1: 2}), ValueError,
     'reslora: rank_pattern keys must be non-empty strings, got 1'),
    ('config: rp key regex', lambda: C(rank_pattern={"(q": 2}), ValueError,
     "reslora: rank_pattern key '(q' is not a valid regular expression (missing ), unterminated subpattern at position 0)"),
    ('config: ap neg', lambda: C(alpha_pattern={"q": -1}), ValueError,
     "reslora: alpha_pattern['q'] must be a lora_alpha > 0, got -1"),
    ('config: ap str', lambda: C(alpha_pattern={"q": "a"}), ValueError,
     "reslora: alpha_pattern['q'] must be a lora_alpha > 0, got 'a'"),
    ('config: task_type', lambda: C(task_type="CLS"), ValueError,
     "reslora: task_type must be None or one of ['CAUSAL_LM', 'SEQ_2_SEQ_LM', 'SEQ_CLS', 'TOKEN_CLS', 'QUESTION_ANS', 'FEATURE_EXTRACTION'], got 'CLS'"),
    ('config: bias some', lambda: C(bias="some"), ValueError,
     "reslora: bias must be one of ['none', 'all', 'lora_only'], got 'some'"),
    ('config: bias None', lambda: C(bias=None), ValueError,
     "reslora: bias must be one of ['none', 'all', 'lora_only'], got None"),
    ('config: rslora str', lambda: C(use_rslora="yes"), ValueError,
     "reslora: use_rslora must be a bool, got 'yes'"),
    ('config: init pissa', lambda: C(init_lora_weights="pissa"), ValueError,
     "reslora: init_lora_weights must be one of [True, False, 'gaussian'], got 'pissa'"),
    ('config: init None', lambda: C(init_lora_weights=None), ValueError,
     "reslora: init_lora_weights must be one of [True, False, 'gaussian'], got None"),
    ('config: from_dict unknown', lambda: C.from_dict({"r": 2, "rank": 3}), ValueError,
     "reslora: unknown ResLoRAConfig fields ['rank']"),
    ('config: from_dict list', lambda: C.from_dict([1]), ValueError,
     'reslora: ResLoRAConfig.from_dict needs a dict of config fields, got list'),
    # wrapping
    ('wrapping: model None', lambda: reslora.get_reslora_model(None, C(target_modules=["0"])), TypeError,
     'reslora: model must be a torch.nn.Module, got NoneType'),
    ('wrapping: model str', lambda: reslora.get_reslora_model("llama", C(target_modules=["0"])), TypeError,
     'reslora: model must be a torch.nn.Module, got str'),
    ('wrapping: config dict', lambda: reslora.get_reslora_model(make("llama"), {"r": 8}), TypeError,
     'reslora: config must be a ResLoRAConfig, got dict'),
    ('wrapping: wrap twice', lambda: reslora.get_reslora_model(llama(), C(r=2)), ValueError,
     'reslora: the model already contains ResLoRA layers; wrap the original model (from_pretrained needs a fresh base model too)'),
    ('wrapping: wrap inner twice', lambda: reslora.get_reslora_model(llama().base_model, C(r=2)), ValueError,
     'reslora: the model already contains ResLoRA layers; wrap the original model (from_pretrained needs a fresh base model too)'),
    ('wrapping: no default targets', lambda: reslora.get_reslora_model(nn.Sequential(nn.Linear(4, 4)), C()), ValueError,
     "reslora: target_modules must be given for model type None (defaults exist for ['bert', 'gpt2', 'llama', 'mistral', 'qwen2', 'roberta'])"),
    ('wrapping: mts nope', lambda: llama(modules_to_save=["nope"]), ValueError,
     "reslora: modules_to_save entry 'nope' names no module of LlamaForCausalLM"),
    ('wrapping: mts overlap target', lambda: llama(target_modules=["q_proj"], modules_to_save=["q_proj"]), ValueError,
     "reslora: target_modules ['q_proj'] match no nn.Linear or Conv1D layer of LlamaForCausalLM (after modules_to_save ['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj', 'model.layers.2.self_attn.q_proj'], which train in full)"),
    ('wrapping: lt out of range', lambda: llama(target_modules=["q_proj"], layers_to_transform=[7]), ValueError,
     "reslora: target_modules ['q_proj'] match no nn.Linear or Conv1D layer of LlamaForCausalLM in layers_to_transform [7]"),
    ('wrapping: lp not found', lambda: llama(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"), ValueError,
     "reslora: target_modules ['q_proj'] match no nn.Linear or Conv1D layer of LlamaForCausalLM in layers_to_transform [0] of layers_pattern 'blocks'"),
    ('wrapping: exclude all', lambda: llama(target_modules=["q_proj"], exclude_modules=["q_proj"]), ValueError,
     "reslora: target_modules ['q_proj'] match no nn.Linear or Conv1D layer of LlamaForCausalLM (after exclude_modules ['q_proj'])"),
    ('wrapping: rank_pattern is', lambda: llama(target_modules=["q_proj"], rank_pattern={r"model\.layers\.1\.self_attn\.q_proj": 4}), ValueError,
     "reslora: chain 'model.layers.*.self_attn.q_proj': block 1 must have the head's (r, lora_alpha, pre_num) = (2, 16, 1), got (4, 16, 1)"),
    ('wrapping: alpha_pattern is', lambda: llama(target_modules=["q_proj"], alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 4}), ValueError,
     "reslora: chain 'model.layers.*.self_attn.q_proj': block 1 must have the head's (r, lora_alpha, pre_num) = (2, 16, 1), got (2, 4, 1)"),
    ('wrapping: seq_cls causal', lambda: llama(target_modules=["q_proj"], task_type="SEQ_CLS"), UserWarning,
     "reslora: task_type 'SEQ_CLS' trains the model's head in full, but LlamaForCausalLM has no module named 'classifier' or 'score': name the head in modules_to_save (or is this the right model class?)"),
    ('wrapping: peft ia3', lambda: reslora.get_reslora_model(peft_model("ia3"), C()), ValueError,
     "reslora: only a plain PEFT LoRA adapter can be continued as ResLoRA, got a IA3 adapter"),
    ('wrapping: peft two adapters', lambda: reslora.get_reslora_model(peft_model("two"), C()), ValueError,
     "reslora: a PEFT model continued as ResLoRA must hold one adapter, got ['default', 'second']"),
    ('wrapping: regex matches nothing', lambda: llama(target_modules=r"model\.layers\.\d+\.self_attn\.qq_proj"), ValueError,
     "reslora: target_modules 'model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.qq_proj' match no nn.Linear or Conv1D layer of LlamaForCausalLM; a string is a regular expression that must match a whole module path (PEFT's rule), such as r'.*\\.q_proj'; a list names modules or path suffixes"),
    ('wrapping: peft.get_peft_model with a ResLoRAConfig', lambda: __import__("peft").get_peft_model(make("llama"), C(target_modules=["q_proj"])), AttributeError,
     "reslora: a ResLoRAConfig is not a PEFT config, so peft.get_peft_model cannot use it: wrap the model with reslora.get_reslora_model(model, config) (after merge_to_lora(), its save_pretrained writes an adapter that PEFT loads)"),
    ('config: pre_num for is', lambda: C(variant="is", pre_num=3), UserWarning,
     "reslora: pre_num = 3 is ignored by the 'is' variant (is always reads the previous block's input); pre_num sets how many earlier blocks a 'bs' or 'ms' shortcut reaches"),
    ('config: pre_num for lora', lambda: C(variant="lora", pre_num=0), UserWarning,
     "reslora: pre_num = 0 is ignored by the 'lora' variant (lora has no shortcut); pre_num sets how many earlier blocks a 'bs' or 'ms' shortcut reaches"),
    ('config: pre_num 0 for ms', lambda: C(variant="ms", pre_num=0), UserWarning,
     "reslora: pre_num = 0 links no earlier block, so a 'ms' model trains as plain LoRA; use variant='lora' for that, or pre_num >= 1 (-1 for every earlier block)"),
    ('merge: after unload', lambda: unloaded().merge_to_lora(), RuntimeError,
     "reslora: merge_to_lora() after unload(): unload() put the original layers back and dropped the adapter, so there is nothing to merge or save; wrap the model again (get_reslora_model) to adapt it"),
    ('save: after unload', lambda: unloaded().save_pretrained(TMP), RuntimeError,
     "reslora: save_pretrained() after unload(): unload() put the original layers back and dropped the adapter, so there is nothing to merge or save; wrap the model again (get_reslora_model) to adapt it"),
    ('merge: merge_and_unload after unload', lambda: unloaded().merge_and_unload(), RuntimeError,
     "reslora: merge_and_unload() after unload(): unload() put the original layers back and dropped the adapter, so there is nothing to merge or save; wrap the model again (get_reslora_model) to adapt it"),
    ('wrapping: bias lora_only no bias', lambda: llama(target_modules=["q_proj"], bias="lora_only"), UserWarning,
     "reslora: bias='lora_only' trains no bias: none of the adapted layers has one"),
    ('wrapping: target embed regex', lambda: llama(target_modules=r".*embed_tokens"), ValueError,
     "reslora: target_modules '.*embed_tokens' names 'model.embed_tokens', a Embedding; reslora adapts nn.Linear and GPT-2 Conv1D layers: name those (or use 'all-linear')"),
    ('wrapping: target rotary', lambda: llama(target_modules=["rotary_emb"]), ValueError,
     "reslora: target_modules ['rotary_emb'] names 'model.rotary_emb', a LlamaRotaryEmbedding; reslora adapts nn.Linear and GPT-2 Conv1D layers: name those (or use 'all-linear')"),
    ('wrapping: target model.norm', lambda: llama(target_modules=["norm"]), ValueError,
     "reslora: target_modules ['norm'] names 'model.norm', a LlamaRMSNorm; reslora adapts nn.Linear and GPT-2 Conv1D layers: name those (or use 'all-linear')"),
    # layer
    ('layer: layer None', lambda: reslora.ResLoRALinear(None, r=2), ValueError,
     'reslora: base_layer must be an nn.Linear or a GPT-2 Conv1D, got NoneType'),
    ('layer: layer conv2d', lambda: reslora.ResLoRALinear(nn.Conv2d(2, 2, 1), r=2), ValueError,
     'reslora: base_layer must be an nn.Linear or a GPT-2 Conv1D, got Conv2d'),
    ('layer: layer r 0', lambda: reslora.ResLoRALinear(nn.Linear(4, 3), r=0), ValueError,
     'reslora: r must be an int >= 1, got 0'),
    ('layer: layer variant', lambda: reslora.ResLoRALinear(nn.Linear(4, 3), r=2, variant="xx"), ValueError,
     "reslora: variant must be one of 'lora', 'is', 'bs', 'ms', got 'xx'"),
    ('layer: layer pre_num', lambda: reslora.ResLoRALinear(nn.Linear(4, 3), r=2, pre_num=-2), ValueError,
     'reslora: pre_num must be -1 (all) or an int >= 0, got -2'),
    ('layer: layer init', lambda: reslora.ResLoRALinear(nn.Linear(4, 3), r=2, init_lora_weights="x"), ValueError,
     "reslora: init_lora_weights must be one of [True, False, 'gaussian'], got 'x'"),
    ('layer: layer rslora', lambda: reslora.ResLoRALinear(nn.Linear(4, 3), r=2, use_rslora=1), ValueError,
     'reslora: use_rslora must be a bool, got 1'),
    ('layer: layer alpha 0', lambda: reslora.ResLoRALinear(nn.Linear(4, 3), r=2, lora_alpha=0), ValueError,
     'reslora: lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got 0.0'),
    ('layer: chain rank', lambda: reslora.ResLoRAChain([lin(variant="is"), reslora.ResLoRALinear(nn.Linear(4, 3), r=3, variant="is")]), ValueError,
     "reslora: chain 'chain': block 1 must have the head's (r, lora_alpha, pre_num) = (2, 16, 1), got (3, 16, 1)"),
    ('layer: chain variant', lambda: reslora.ResLoRAChain([lin(variant="is"), lin(variant="ms")]), ValueError,
     "reslora: chain 'chain': block 1 must have the head's variant 'is', got 'ms'"),
    ('layer: chain shape is', lambda: reslora.ResLoRAChain([lin(variant="is"), reslora.ResLoRALinear(nn.Linear(5, 3), r=2, variant="is")]), ValueError,
     "reslora: chain 'chain': block 1 must have the head's shape [d_out, d_in] = [3, 4] for the 'is' shortcut, got [3, 5]; start a new chain for it"),
    ('layer: chain alpha', lambda: reslora.ResLoRAChain([lin(variant="ms"), reslora.ResLoRALinear(nn.Linear(4, 3), r=2, lora_alpha=4, variant="ms")]), ValueError,
     "reslora: chain 'chain': block 1 must have the head's (r, lora_alpha, pre_num) = (2, 16, 1), got (2, 4, 1)"),
    ('layer: chain pre_num', lambda: reslora.ResLoRAChain([lin(variant="ms"), lin(variant="ms", pre_num=2)]), ValueError,
     "reslora: chain 'chain': block 1 must have the head's (r, lora_alpha, pre_num) = (2, 16, 1), got (2, 16, 2)"),
    ('layer: chain not block', lambda: reslora.ResLoRAChain([nn.Linear(4, 3)]), TypeError,
     "reslora: chain 'chain': blocks must be ResLoRALinear, got Linear"),
    ('layer: chain forward count', lambda: reslora.ResLoRAChain([lin(), lin()])([torch.randn(2, 4)]), ValueError,
     "reslora: chain 'chain': forward needs one input per block (2), got 1"),
    ('layer: chain load_pairs count', lambda: reslora.ResLoRAChain([lin(), lin()]).load_pairs([]), ValueError,
     "reslora: chain 'chain' has 2 blocks, got 0 pairs"),
    ('layer: load_lora shapes', lambda: lin().load_lora(torch.randn(2, 5), torch.randn(3, 2)), ValueError,
     'reslora: A must have shape [r, d_in] = [2, 4], got [2, 5]'),
    ('layer: load_lora rank', lambda: lin().load_lora(torch.randn(2, 4), torch.randn(3, 3)), ValueError,
     'reslora: B must have shape [d_out, r] = [3, 2], got [3, 3]'),
    ('layer: load_lora B rows', lambda: lin().load_lora(torch.randn(2, 4), torch.randn(4, 2)), ValueError,
     'reslora: B must have shape [d_out, r] = [3, 2], got [4, 2]'),
    ('layer: merge_chain empty', lambda: reslora.merge_chain([]), ValueError,
     'reslora: merge_chain needs at least one block, got none'),
    ('layer: merge_chain bad', lambda: reslora.merge_chain([lin(variant="is")], "mid"), ValueError,
     "reslora: merge 'mid' does not apply to variant 'is'; expected one of 'input', 'weight', 'fit'"),
    ('layer: merge_chain fit nocal', lambda: reslora.merge_chain([lin(variant="is"), lin(variant="is")], "fit"), ValueError,
     "reslora: merge 'fit' needs the calibration statistics of block 1 (merge_to_lora(merge='fit', inputs=...) gathers them in Python, ResLoRAChain::calibrate in C++), got none"),
    ('layer: merge_chain not blocks', lambda: reslora.merge_chain([nn.Linear(4, 3)]), TypeError,
     'reslora: merge_chain needs ResLoRALinear blocks, got Linear'),
    # forward
    ('forward: x int', lambda: lin()(torch.ones(2, 4, dtype=torch.long)), RuntimeError,
     'reslora::lora_linear: x must have the dtype of weight (Float; cast the input or the layer, or run under autocast), got Long'),
    ('forward: x 0d', lambda: lin()(torch.tensor(1.0)), RuntimeError,
     'reslora::lora_linear: x must have at least 1 dimension [..., d_in], got a 0-D tensor'),
    ('forward: x f64', lambda: lin()(torch.randn(2, 4, dtype=torch.float64)), RuntimeError,
     'reslora::lora_linear: x must have the dtype of weight (Float; cast the input or the layer, or run under autocast), got Double'),
    ('forward: x meta', lambda: lin()(torch.randn(2, 4, device="meta")), RuntimeError,
     'reslora::lora_linear: x must be on the device of weight (cpu), got meta'),
    ('forward: x list', lambda: lin()([1.0, 2.0, 3.0, 4.0]), RuntimeError,
     "reslora::lora_linear() Expected a value of type 'Tensor' for argument 'x' but instead found type 'list'."),
    ('forward: x empty width', lambda: lin()(torch.randn(2, 0)), RuntimeError,
     'reslora::lora_linear: x must have d_in = 4 features in its last dimension (weight is [d_out, d_in] = [3, 4]), got x of shape [2, 0]'),
    ('forward: model attr', lambda: llama().nope, AttributeError,
     "'ResLoRAModel' object has no attribute 'nope' (nor has the wrapped LlamaForCausalLM)"),
    ('forward: model add_adapter', lambda: llama().add_adapter, AttributeError,
     "reslora: ResLoRAModel has no 'add_adapter': it holds one ResLoRA adapter; use disable_adapter() (a context manager), merge_to_lora(), unload() or merge_and_unload()"),
    ('forward: model set_adapter', lambda: llama().set_adapter("x"), AttributeError,
     "reslora: ResLoRAModel has no 'set_adapter': it holds one ResLoRA adapter; use disable_adapter() (a context manager), merge_to_lora(), unload() or merge_and_unload()"),
    ('forward: gc kwargs', lambda: llama().gradient_checkpointing_enable(gradient_checkpointing_kwargs=5), TypeError,
     'reslora: gradient_checkpointing_kwargs must be a dict or None, got 5'),
    ('forward: checkpoint noncallable', lambda: reslora.checkpoint(5, torch.randn(2)), TypeError,
     'reslora.checkpoint: function must be callable, got int'),
    # merge
    ('merge: merge twice', lambda: (lambda m: (m.merge_to_lora(), m.merge_to_lora()))(seq(variant="lora")), RuntimeError,
     'reslora: the model is already merged; merge_to_lora() would apply the merge twice'),
    ('merge: merge 5', lambda: seq().merge_to_lora(merge=5), ValueError,
     'reslora: merge must be a merge name or None, got 5'),
    ('merge: merge fit no inputs', lambda: seq().merge_to_lora(merge="fit"), ValueError,
     "reslora: merge 'fit' needs calibration inputs: merge_to_lora(merge='fit', inputs=batches), got inputs=None"),
    ('merge: merge fit bs', lambda: seq(variant="bs").merge_to_lora(merge="fit"), ValueError,
     "reslora: merge 'fit' does not apply to variant 'bs'; expected one of 'exact'"),
    ('merge: merge weight ms', lambda: seq(variant="ms").merge_to_lora(merge="weight"), ValueError,
     "reslora: merge 'weight' does not apply to variant 'ms'; expected one of 'input', 'mid', 'fit'"),
    ('merge: merge bogus', lambda: seq().merge_to_lora(merge="average"), ValueError,
     "reslora: merge must be one of 'exact', 'input', 'weight', 'mid', 'fit', got 'average'"),
    ('merge: ridge -1', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="fit", ridge=-1), ValueError,
     'reslora: ridge must be > 0 (relative to tr(xx) / d_in), got -1'),
    ('merge: ridge nan', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="fit", ridge=float("nan")), ValueError,
     'reslora: ridge must be > 0 (relative to tr(xx) / d_in), got nan'),
    ('merge: ridge str', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="fit", ridge="1e-4"), ValueError,
     "reslora: ridge must be a number > 0 (relative to tr(xx) / d_in), got '1e-4'"),
    ('merge: max_tokens 0', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="fit", max_tokens=0), ValueError,
     'reslora: max_tokens must be None (all) or an int >= 1, got 0'),
    ('merge: max_tokens float', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="fit", max_tokens=2.5), ValueError,
     'reslora: max_tokens must be None (all) or an int >= 1, got 2.5'),
    ('merge: chains_at_once 0', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="fit", chains_at_once=0), ValueError,
     'reslora: chains_at_once must be None or an int >= 1, got 0'),
    ('merge: chains gen', lambda: llama(target_modules=["q_proj", "v_proj"]).merge_to_lora((b for b in [batch("llama")]), merge="fit", chains_at_once=1), ValueError,
     'reslora: chains_at_once runs the calibration batches several times: give a list or a DataLoader, got a one-shot iterator (generator)'),
    ('merge: sequential gen', lambda: llama(target_modules=["q_proj", "v_proj"]).merge_to_lora((b for b in [batch("llama")]), merge="fit", sequential=True), ValueError,
     'reslora: sequential=True runs the calibration batches several times: give a list or a DataLoader, got a one-shot iterator (generator)'),
    ('merge: sequential str', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="fit", sequential="yes"), ValueError,
     "reslora: sequential must be True or False, got 'yes'"),
    ('merge: sequential input', lambda: seq().merge_to_lora(torch.randn(64, 4), merge="input", sequential=True), ValueError,
     "reslora: sequential=True refits the fit merge, got merge='input'"),
    ('merge: inputs int', lambda: seq().merge_to_lora(5, merge="fit"), ValueError,
     'reslora: inputs must be None, a batch (a dict of model arguments, a tensor of input ids, or a tuple / list whose first item is the ids) or an iterable of batches (a list, a DataLoader), got int'),
    ('merge: inputs empty', lambda: seq().merge_to_lora([], merge="fit"), ValueError,
     "reslora: merge 'fit' got no calibration batch (inputs is empty)"),
    ('merge: a batch of strings', lambda: seq(variant="is").merge_to_lora([["a", "b"]], merge="fit"), ValueError,
     "reslora: merge_to_lora(inputs=...): each item must be a batch (a dict of model arguments, a tensor of input ids, or a tuple / list whose first item is the ids), got list"),
    ('merge: eval_inputs int', lambda: seq().merge_to_lora(eval_inputs=5), ValueError,
     'reslora: eval_inputs must be None, a batch (a dict of model arguments, a tensor of input ids, or a tuple / list whose first item is the ids), got int'),
    ('merge: inputs wrong width', lambda: seq().merge_to_lora(torch.randn(64, 5), merge="fit"), RuntimeError,
     'reslora::lora_linear: x must have d_in = 4 features in its last dimension (weight is [d_out, d_in] = [4, 4]), got x of shape [64, 5]'),
    # save / load
    ('save: save peft unmerged', lambda: seq().save_pretrained(os.path.join(TMP, "a"), format="peft"), RuntimeError,
     'reslora: a PEFT LoRA adapter can only be saved after merge_to_lora(): the shortcuts have no PEFT equivalent'),
    ('save: save reslora merged', lambda: (lambda m: (m.merge_to_lora(), m.save_pretrained(os.path.join(TMP, "b"), format="reslora")))(seq(variant="lora")), RuntimeError,
     "reslora: the model is merged and has no shortcuts left; save it as a PEFT adapter (format='peft')"),
    ('save: save onnx', lambda: seq().save_pretrained(os.path.join(TMP, "c"), format="onnx"), ValueError,
     "reslora: format must be 'peft' or 'reslora', got 'onnx'"),
    ('save: save kwargs', lambda: seq().save_pretrained(os.path.join(TMP, "d"), max_shard_size="1GB"), TypeError,
     "reslora: save_pretrained got unexpected keyword arguments ['max_shard_size']"),
    ('save: save dir None', lambda: seq().save_pretrained(None), TypeError,
     'reslora: save_directory must be a path (str or os.PathLike), got NoneType'),
    ('save: save dir int', lambda: seq().save_pretrained(5), TypeError,
     'reslora: save_directory must be a path (str or os.PathLike), got int'),
    ('save: save to file', lambda: (open(os.path.join(TMP, "f"), "w").close(), seq().save_pretrained(os.path.join(TMP, "f"))), NotADirectoryError,
     "reslora: save_directory must be a directory, got the file '{TMP}/f'"),
    ('save: load missing dir', lambda: reslora.ResLoRAModel.from_pretrained(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), os.path.join(TMP, "missing")), FileNotFoundError,
     "reslora: no ResLoRA checkpoint in '{TMP}/missing': expected reslora_model.safetensors (save_pretrained) or model.safetensors (an HF Trainer checkpoint)"),
    ('save: load empty dir', lambda: (os.makedirs(os.path.join(TMP, "empty"), exist_ok=True), reslora.ResLoRAModel.from_pretrained(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), os.path.join(TMP, "empty"))), FileNotFoundError,
     "reslora: no ResLoRA checkpoint in '{TMP}/empty': expected reslora_model.safetensors (save_pretrained) or model.safetensors (an HF Trainer checkpoint)"),
    ('save: load wrong shapes', lambda: reslora.ResLoRAModel.from_pretrained(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4)), saved("s1")), ValueError,
     "reslora: the checkpoint links blocks as {'*': ['0', '1']}, this model {'*': ['0'], '*#1': ['1']}"),
    ('save: load wrong model', lambda: reslora.ResLoRAModel.from_pretrained(make("llama"), saved("s2")), ValueError,
     "reslora: target_modules ['0', '1'] names 'model.layers.0', a LlamaDecoderLayer; reslora adapts nn.Linear and GPT-2 Conv1D layers: name those (or use 'all-linear')"),
    ('save: load wrapped', lambda: reslora.ResLoRAModel.from_pretrained(seq(), saved("s3")), ValueError,
     'reslora: the model already contains ResLoRA layers; wrap the original model (from_pretrained needs a fresh base model too)'),
    ('save: load merged', lambda: (lambda m: (m.merge_to_lora(), m.load_checkpoint(saved("s4"))))(seq()), RuntimeError,
     'reslora: cannot load a ResLoRA checkpoint into a merged model'),
    ('save: load other variant', lambda: seq(variant="ms").load_checkpoint(saved("s5")), ValueError,
     "reslora: the checkpoint has variant = 'is', this model 'ms'"),
    ('save: load other r', lambda: seq(r=3).load_checkpoint(saved("s6")), ValueError,
     'reslora: the checkpoint has r = 2, this model 3'),
    ('save: load_state_dict shapes', lambda: seq().load_state_dict({k: torch.zeros(1) for k in seq().state_dict()}), ValueError,
     "reslora: the state dict: the '_extra_state' entry must be a uint8 vector (the adapter's description), got a torch.float32 tensor of shape [1]"),
    ('save: load_state_dict extra', lambda: seq().load_state_dict({**seq().state_dict(), "_extra_state": torch.zeros(3)}), ValueError,
     "reslora: the state dict: the '_extra_state' entry must be a uint8 vector (the adapter's description), got a torch.float32 tensor of shape [3]"),
    # raw ops
    ('raw: down x 0d', lambda: ops.lora_down(torch.tensor(1.0), None, A, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: x must have at least 1 dimension [..., d_in], got a 0-D tensor'),
    ('raw: down A 1d', lambda: ops.lora_down(x, None, torch.randn(4), 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: A must be a 2-D tensor [r, d_in] = [r, 4], got a 1-D tensor of shape [4]'),
    ('raw: down A width', lambda: ops.lora_down(x, None, torch.randn(2, 5), 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: A must have shape [r, d_in] = [2, 4], got [2, 5]'),
    ('raw: down x_prev shape', lambda: ops.lora_down(x, torch.randn(2, 4), A, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: x_prev must have the shape of x [3, 4], got [2, 4]'),
    ('raw: down dtype', lambda: ops.lora_down(x, None, A.double(), 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: A must have the dtype of x (Float), got Double'),
    ('raw: down x_prev dtype', lambda: ops.lora_down(x, x.double(), A, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: x_prev must have the dtype of x (Float), got Double'),
    ('raw: down device', lambda: ops.lora_down(x, None, A.to("meta"), 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: A must be on the device of x (cpu), got meta'),
    ('raw: down dropout neg', lambda: ops.lora_down(x, None, A, -0.5, S(0, x), 0, 2), RuntimeError,
     'reslora::lora_down: dropout must be in [0, 1), got -0.5'),
    ('raw: down dropout 1', lambda: ops.lora_down(x, None, A, 1.0, S(0, x), 0, 2), RuntimeError,
     'reslora::lora_down: dropout must be in [0, 1), got 1'),
    ('raw: down dropout nan', lambda: ops.lora_down(x, None, A, float("nan"), S(0, x), 0, 2), RuntimeError,
     'reslora::lora_down: dropout must be in [0, 1), got nan'),
    ('raw: down seg 0', lambda: ops.lora_down(x, None, A, 0.0, None, 0, 0), RuntimeError,
     'reslora::lora_down: block_rank must be >= 1 and divide the rows of A (2), got 0'),
    ('raw: down seg div', lambda: ops.lora_down(x, None, torch.randn(3, 4), 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: block_rank must be >= 1 and divide the rows of A (3), got 2'),
    ('raw: down x int', lambda: ops.lora_down(x.long(), None, A.long(), 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_down: x must be float32, float64, float16 or bfloat16, got Long'),
    ('raw: up W 1d', lambda: ops.lora_up(x, torch.randn(4), None, z, B, 1.0), RuntimeError,
     'reslora::lora_up: weight must be a 2-D tensor [d_out, d_in], got a 1-D tensor of shape [4]'),
    ('raw: up W width', lambda: ops.lora_up(x, torch.randn(5, 6), None, z, B, 1.0), RuntimeError,
     'reslora::lora_up: weight must have shape [d_out, d_in] = [5, 4], got [5, 6]'),
    ('raw: up bias size', lambda: ops.lora_up(x, W, torch.randn(4), z, B, 1.0), RuntimeError,
     'reslora::lora_up: bias must have shape [d_out] = [5], got [4]'),
    ('raw: up z rank', lambda: ops.lora_up(x, W, None, torch.randn(3, 3), B, 1.0), RuntimeError,
     'reslora::lora_up: z must have shape [..., r] = [3, 2], got [3, 3]'),
    ('raw: up z rows', lambda: ops.lora_up(x, W, None, torch.randn(4, 2), B, 1.0), RuntimeError,
     'reslora::lora_up: z must have shape [..., r] = [3, 2], got [4, 2]'),
    ('raw: up B dout', lambda: ops.lora_up(x, W, None, z, torch.randn(6, 2), 1.0), RuntimeError,
     'reslora::lora_up: B must have shape [d_out, r] = [5, 2], got [6, 2]'),
    ('raw: up scaling nan', lambda: ops.lora_up(x, W, None, z, B, float("nan")), RuntimeError,
     'reslora::lora_up: scaling must be finite, got nan'),
    ('raw: up dtype W', lambda: ops.lora_up(x, W.double(), None, z, B, 1.0), RuntimeError,
     'reslora::lora_up: weight must have the dtype of x (Float), got Double'),
    ('raw: up bias dtype', lambda: ops.lora_up(x, W, torch.randn(5).double(), z, B, 1.0), RuntimeError,
     'reslora::lora_up: bias must have the dtype of x (Float), got Double'),
    ('raw: linear z_shortcut', lambda: ops.lora_linear(x, None, W, None, A, B, torch.randn(3, 3), 1.0, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_linear: z_shortcut must have shape [3, 2], got [3, 3]'),
    ('raw: linear x_prev', lambda: ops.lora_linear(x, torch.randn(3, 5), W, None, A, B, None, 1.0, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_linear: x_prev must have the shape of x [3, 4], got [3, 5]'),
    ('raw: linear bias', lambda: ops.lora_linear(x, None, W, torch.randn(3), A, B, None, 1.0, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_linear: bias must have shape [d_out] = [5], got [3]'),
    ('raw: linear W width', lambda: ops.lora_linear(x, None, torch.randn(5, 3), None, A, B, None, 1.0, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_linear: x must have d_in = 3 features in its last dimension (weight is [d_out, d_in] = [5, 3]), got x of shape [3, 4]'),
    ('raw: linear B dout', lambda: ops.lora_linear(x, None, W, None, A, torch.randn(4, 2), None, 1.0, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_linear: B must have shape [d_out, r] = [5, 2], got [4, 2]'),
    ('raw: linear scaling inf', lambda: ops.lora_linear(x, None, W, None, A, B, None, float("inf"), 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_linear: scaling must be finite, got inf'),
    ('raw: linear z_shortcut dtype', lambda: ops.lora_linear(x, None, W, None, A, B, z.double(), 1.0, 0.0, None, 0, 2), RuntimeError,
     'reslora::lora_linear: z_shortcut must have the dtype of x (Float), got Double'),
    ('raw: linbw grad_y', lambda: ops._lora_linear_backward(torch.randn(3, 4), None, x, None, W, A, B, z, None, 1.0, 0.0, None, 0, 2, True), RuntimeError,
     'reslora::_lora_linear_backward: grad_y must have shape [3, 5], got [3, 4]'),
    ('raw: linbw z', lambda: ops._lora_linear_backward(torch.randn(3, 5), None, x, None, W, A, B, torch.randn(3, 3), None, 1.0, 0.0, None, 0, 2, True), RuntimeError,
     'reslora::_lora_linear_backward: z must have shape [..., r] = [3, 2], got [3, 3]'),
    ('raw: downbw grad_z', lambda: ops._lora_down_backward(torch.randn(3, 3), x, None, A, 0.0, None, 0, 2, True), RuntimeError,
     'reslora::_lora_down_backward: grad_z must have shape [3, 2], got [3, 3]'),
    ('raw: upbw grad_y', lambda: ops._lora_up_backward(torch.randn(3, 4), W, z, B, 1.0, True), RuntimeError,
     'reslora::_lora_up_backward: weight must have shape [d_out, d_in] with d_out = 4, got [5, 4]'),
    ('raw: upbw z', lambda: ops._lora_up_backward(torch.randn(3, 5), W, torch.randn(3, 3), B, 1.0, True), RuntimeError,
     'reslora::_lora_up_backward: z must have shape [3, 2], got [3, 3]'),
    ('raw: stats count dtype', lambda: ops.record_stats_(torch.zeros(4), torch.zeros(4), torch.zeros(1), x, z), RuntimeError,
     'reslora::record_stats_: count must be an int64 tensor with one element, got Float of shape [1]'),
    ('raw: stats lens', lambda: ops.record_stats_(torch.zeros(4), torch.zeros(5), torch.zeros(1, dtype=torch.long), x, z), RuntimeError,
     'reslora::record_stats_: z_norms must have the length of x_norms (4), got 5'),
    ('raw: stats ring 2d', lambda: ops.record_stats_(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(1, dtype=torch.long), x, z), RuntimeError,
     'reslora::record_stats_: x_norms must be a 1-D floating tensor (float32 recommended) with at least one slot, got Float of shape [2, 2]'),
    ('raw: stats ring empty', lambda: ops.record_stats_(torch.zeros(0), torch.zeros(0), torch.zeros(1, dtype=torch.long), x, z), RuntimeError,
     'reslora::record_stats_: x_norms must be a 1-D floating tensor (float32 recommended) with at least one slot, got Float of shape [0]'),
    ('raw: stats count shape', lambda: ops.record_stats_(torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.long), x, z), RuntimeError,
     'reslora::record_stats_: count must be an int64 tensor with one element, got Long of shape [2]'),
    ('raw: stats_mean count', lambda: ops.stats_mean(torch.zeros(4), torch.zeros(1)), RuntimeError,
     'reslora::stats_mean: count must be an int64 tensor with one element, got Float of shape [1]'),
    ('raw: stats_mean ring', lambda: ops.stats_mean(torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long)), RuntimeError,
     'reslora::stats_mean: ring must be a 1-D floating tensor (float32 recommended) with at least one slot, got Long of shape [4]'),
    # C++ core
    ('C++: merge lens', lambda: _C.merge_chain([None, None], [A], [B], [None], [None], "is", "input", 1, 1.0), RuntimeError,
     'reslora.merge_chain: weights, As, Bs, x_means and z_means must have one entry per block (1), got 2, 1, 1, 1, 1'),
    ('C++: merge B rank', lambda: merge2("input", Bs=(B, torch.randn(5, 3))), RuntimeError,
     'reslora: merge block 1 needs A [r, d_in] and B [d_out, r], got A [2, 4] and B [5, 3]'),
    ('C++: merge weight shape', lambda: merge2("weight", weights=(torch.randn(3, 3), torch.randn(3, 3))), ValueError,
     'reslora: merge block 0: the base weight must have shape [d_out, d_in] = [5, 4], got [3, 3]'),
    ('C++: merge tokens', lambda: merge2("fit", means=XM, **dict(FIT, tokens=[10])), RuntimeError,
     'reslora.merge_chain: xx, zx and tokens must be empty or have one entry per block (2), got 2, 2, 1'),
    ('C++: merge xx shape', lambda: merge2("fit", means=XM, **dict(FIT, xx=[torch.eye(4), torch.eye(3)])), ValueError,
     "reslora: merge 'fit': block 1 needs xx of shape [4, 4], got [3, 3]"),
    ('C++: merge zx shape', lambda: merge2("fit", means=XM, **dict(FIT, zx=[None, torch.zeros(3, 4)])), ValueError,
     "reslora: merge 'fit': block 1 needs zx of shape [2, 4], got [3, 4]"),
    ('C++: merge tokens 0', lambda: merge2("fit", means=XM, **dict(FIT, tokens=[10, 0])), ValueError,
     "reslora: merge 'fit' needs the calibration statistics of block 1 (merge_to_lora(merge='fit', inputs=...) gathers them in Python, ResLoRAChain::calibrate in C++), got none"),
    ('C++: link shape', lambda: _C.check_link("c", 1, "is", 2, 4.0, 1, 3, 4, "is", 2, 4.0, 1, 3, 5), ValueError,
     "reslora: chain 'c': block 1 must have the head's shape [d_out, d_in] = [3, 4] for the 'is' shortcut, got [3, 5]; start a new chain for it"),
    ('C++: link pos', lambda: _C.check_link("c", -1, "is", 2, 4.0, 1, 3, 4, "is", 2, 4.0, 1, 3, 4), ValueError,
     "reslora: chain 'c': position must be >= 0, got -1"),
    ('C++: chain fwd variant', lambda: _C._chain_forward_cpp("iz", 1, 2, 4.0, 0.0, True, [W], [A], [B], [x], [], 0), ValueError,
     "reslora: variant must be one of 'lora', 'is', 'bs', 'ms', got 'iz'"),
    ('C++: chain fwd r', lambda: _C._chain_forward_cpp("is", 1, 3, 4.0, 0.0, True, [W], [A], [B], [x], [], 0), ValueError,
     'reslora: block 0 needs A [3, 4] and B [5, 3] (r = 3), got A [2, 4] and B [5, 2]'),
    ('C++: chain fwd dropout', lambda: _C._chain_forward_cpp("is", 1, 2, 4.0, 1.5, True, [W], [A], [B], [x], [], 0), ValueError,
     "reslora: lora_dropout must be a number in [0, 1) that keeps at least 2^-15 of the inputs (the mask's resolution), got 1.5"),
    ('C++: merge variant', lambda: _C.merge_chain([None], [A], [B], [None], [None], "iss", "input", 1, 1.0), ValueError,
     "reslora: variant must be one of 'lora', 'is', 'bs', 'ms', got 'iss'"),
    ('C++: merge name', lambda: _C.merge_chain([None], [A], [B], [None], [None], "is", "bogus", 1, 1.0), ValueError,
     "reslora: merge must be one of 'exact', 'input', 'weight', 'mid', 'fit', got 'bogus'"),
    ('C++: merge weight none', lambda: merge2("weight"), RuntimeError,
     "reslora: merge 'weight' needs each block's base weight"),
    ('C++: merge A shapes', lambda: merge2("input", As=(A, torch.randn(3, 4))), RuntimeError,
     'reslora: merge block 1 needs A [r, d_in] and B [d_out, r], got A [3, 4] and B [5, 2]'),
    ('C++: merge fit nosums', lambda: merge2("fit"), RuntimeError,
     "reslora: merge 'fit' needs the x-norm statistics of block 1, got none"),
    ('C++: merge ridge', lambda: merge2("fit", means=XM, ridge=-1.0, **FIT), ValueError,
     'reslora: ridge must be > 0 (relative to tr(xx) / d_in), got -1'),
    ('C++: check_merge', lambda: _C.check_merge("lora", "input"), ValueError,
     "reslora: merge 'input' does not apply to variant 'lora'; expected one of 'exact'"),
    ('C++: reach', lambda: _C.shortcut_reach("is", -1, 1), ValueError,
     'reslora: position must be >= 0, got -1'),
    ('C++: merges_for', lambda: _C.merges_for("x"), ValueError,
     "reslora: variant must be one of 'lora', 'is', 'bs', 'ms', got 'x'"),
    ('C++: chain fwd count', lambda: _C._chain_forward_cpp("is", 1, 2, 4.0, 0.0, True, [W, W], [A, A], [B, B], [x], [], 0), RuntimeError,
     "reslora: chain 'cpp': forward needs one input per block (2), got 1"),
    ('C++: chain fwd shapes', lambda: _C._chain_forward_cpp("is", 1, 2, 4.0, 0.0, True, [W, W], [A, A], [B, B], [x, torch.randn(3, 6)], [], 0), RuntimeError,
     'reslora::lora_linear: x must have d_in = 4 features in its last dimension (weight is [d_out, d_in] = [5, 4]), got x of shape [3, 6]'),
    ('C++: chain fit ridge', lambda: _C._chain_fit_cpp("is", 1, 2, 4.0, [W, W], [A, A], [B, B], [x, x], [x, x], -1.0), ValueError,
     'reslora: ridge must be > 0 (relative to tr(xx) / d_in), got -1'),
    ('C++: validate', lambda: _C.validate_options("is", 2, 4.0, 0.0, 1, 0), ValueError,
     'reslora: stats_window must be an int >= 1, got 0'),

]
# fmt: on


def test_the_battery_is_large():
    assert len(CASES) >= 150
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("call,kind,message", [pytest.param(c, k, m, id=i) for i, c, k, m in CASES])
def test_bad_input_gets_a_clear_message(call, kind, message):
    message = message.replace("{TMP}", TMP)
    if issubclass(kind, Warning):
        with pytest.warns(kind) as record:
            call()
        assert message in [str(w.message) for w in record]
        return
    with pytest.raises(kind) as info:
        call()
    assert str(info.value).splitlines()[0] == message
