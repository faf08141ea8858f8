import pytest
import torch

from generation.resnet import GroupNorm, ResNet, ResNetConfig, adapt_first_conv, load_backbone_weights


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("maxpool", [True, False])
def test_stage_shapes_and_strides(depth, maxpool):
    torch.manual_seed(0)
    config = ResNetConfig(depth=depth, width=4, maxpool=maxpool, in_channels=2, norm="group")
    model = ResNet(config).eval()
    size = 64
    outputs = model(torch.randn(2, 2, size, size))
    strides = (4, 8, 16, 32) if maxpool else (2, 4, 8, 16)
    expected_channels = tuple(4 * m * (4 if depth >= 50 else 1) for m in (1, 2, 4, 8))
    assert model.stage_channels == expected_channels
    assert len(outputs) == 4
    for output, stride, channels in zip(outputs, strides, expected_channels):
        assert output.shape == (2, channels, size // stride, size // stride)


def test_rejects_wrong_input_channels():
    model = ResNet(ResNetConfig(width=4, in_channels=1))
    with pytest.raises(AssertionError):
        model(torch.randn(1, 3, 32, 32))


def test_bad_config():
    with pytest.raises(ValueError):
        ResNetConfig(depth=42)
    with pytest.raises(ValueError):
        ResNetConfig(norm="layer")


def test_zero_init_residual_makes_blocks_identity_on_branch():
    model = ResNet(ResNetConfig(width=4, zero_init_residual=True))
    assert torch.all(model.layer1[0].bn2.weight == 0)
    model = ResNet(ResNetConfig(width=4, zero_init_residual=False))
    assert torch.all(model.layer1[0].bn2.weight == 1)


def test_load_backbone_weights_copies_matching_tensors_under_prefix():
    torch.manual_seed(0)
    source = ResNet(ResNetConfig(width=8, in_channels=3))
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter)
    state = {f"encoder_q.backbone.{k}": v for k, v in source.state_dict().items()}
    state["encoder_q.head.0.weight"] = torch.randn(5, 5)

    target = ResNet(ResNetConfig(width=8, in_channels=3))
    loaded = load_backbone_weights(target, state)
    assert set(loaded) == set(target.state_dict())
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name])


def test_load_backbone_weights_adapts_stem_and_skips_mismatched_shapes():
    torch.manual_seed(0)
    source = ResNet(ResNetConfig(width=8, in_channels=3))
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter)
    state = dict(source.state_dict())
    state["layer4.1.conv2.weight"] = torch.randn(3, 3, 3, 3)  # wrong shape: must be skipped

    sketch_trunk = ResNet(ResNetConfig(width=8, in_channels=1))
    before = sketch_trunk.state_dict()["layer4.1.conv2.weight"].clone()
    loaded = load_backbone_weights(sketch_trunk, state)
    assert "conv1.weight" in loaded and "layer4.1.conv2.weight" not in loaded
    assert torch.equal(sketch_trunk.state_dict()["layer4.1.conv2.weight"], before)
    # A grey image in 1 channel gives the same stem response as the same grey image in RGB.
    grey = torch.randn(1, 1, 16, 16)
    rgb_response = torch.nn.functional.conv2d(grey.repeat(1, 3, 1, 1), source.conv1.weight, stride=2, padding=3)
    sketch_response = torch.nn.functional.conv2d(grey, sketch_trunk.conv1.weight, stride=2, padding=3)
    assert torch.allclose(rgb_response, sketch_response, atol=1e-4)

    four = ResNet(ResNetConfig(width=8, in_channels=4, maxpool=False))
    assert "conv1.weight" in load_backbone_weights(four, state)
    assert four.conv1.weight.shape == (8, 4, 7, 7)


def test_adapt_first_conv_preserves_flat_response():
    weight = torch.randn(6, 3, 3, 3)
    for channels in (1, 2, 3, 4, 7):
        adapted = adapt_first_conv(weight, channels)
        assert adapted.shape == (6, channels, 3, 3)
        assert torch.allclose(adapted.sum(dim=1), weight.sum(dim=1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_of_a_channels_last_tensor_matches_torch_and_keeps_its_layout(dtype):
    torch.manual_seed(0)
    reference = torch.nn.GroupNorm(8, 32)
    torch.nn.init.normal_(reference.weight), torch.nn.init.normal_(reference.bias)
    norm = GroupNorm(8, 32)
    norm.load_state_dict(reference.state_dict())  # same parameters, same checkpoint keys
    x = torch.randn(4, 32, 12, 12).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = norm(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference(x))
    out.square().sum().backward()
    assert norm.weight.grad is not None and x.grad.shape == x.shape
