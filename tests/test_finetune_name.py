"""``oba_fx.finetune`` stays callable after the submodule of the same name is imported."""

import importlib

import torch


def test_oba_fx_finetune_is_callable_after_its_submodule_is_imported():
    import oba_fx

    importlib.import_module("oba_fx.finetune")  # binds the package attribute to the module
    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
    before = model.weight.detach().clone()
    result = oba_fx.finetune(model, data, epochs=1, lr=0.1, progress=False)
    assert len(result.train_loss) == 1
    assert not torch.equal(model.weight.detach(), before)
