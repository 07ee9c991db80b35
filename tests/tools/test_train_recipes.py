"""tools/train.py recipe options: gradient accumulation, cooldown epochs, DeiT distillation and --sync-bn, on CPU."""
import contextlib
import math
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from tests.tools import test_train
from tests.tools.test_train import REPO_ROOT, _summary, _train_args, train

# the digits fixtures of test_train.py (a module-scoped export, made again for this module)
digits_dir, digits_subset = test_train.digits_dir, test_train.digits_subset


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _assert_same_weights(a, b, keys=('state_dict',), atol=1e-6, rtol=0.):
    for key in keys:
        assert set(a[key]) == set(b[key])
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=rtol, atol=atol, msg=f'{key} {name}')


def test_grad_accum_matches_larger_batch(digits_subset, tmp_path):
    # test_convnext has no BatchNorm or dropout and --no-aug draws nothing, so 2 x 16 images per update are the same
    # 32 images in the same order as one batch of 32. SGD's step is linear in the gradient (a loss not divided by 2
    # doubles it, which Adam would hide); the per-update warmup fails if the schedule counted batches.
    flags = ['--opt', 'sgd', '--lr', '0.05', '--sched-on-updates', '--warmup-epochs', '1', '--warmup-lr', '0']
    big, small = tmp_path / 'big', tmp_path / 'small'
    train.main(_train_args(digits_subset, big, 1, *flags))
    train.main(_train_args(digits_subset, small, 1, *flags, '-b', '16', '--grad-accum-steps', '2'))

    a, b = _load(big / 'last.pth.tar'), _load(small / 'last.pth.tar')
    _assert_same_weights(a, b, atol=1e-6, rtol=1e-4)
    row_a, row_b = _summary(big)[0], _summary(small)[0]
    assert float(row_b['lr']) == pytest.approx(float(row_a['lr']), rel=1e-9)  # 9 updates in both
    for field in ('train_loss', 'eval_loss', 'eval_top1'):
        assert float(row_b[field]) == pytest.approx(float(row_a[field]), rel=1e-4, abs=1e-6)


class _NoSyncLinear(nn.Linear):
    """A linear layer with DDP's ``no_sync``, recording whether each forward ran inside it."""

    def __init__(self):
        super().__init__(6, 3)
        self.in_no_sync, self.calls = False, []

    def forward(self, input):
        self.calls.append(self.in_no_sync)
        return super().forward(input)

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


def test_grad_accum_last_partial_group():
    # 5 batches with --grad-accum-steps 2: groups (0, 1), (2, 3) and the epoch's last, shorter, (4,)
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(5)]
    model = _NoSyncLinear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.)  # the weights stay put: the expected gradients are plain
    grads = []
    optimizer.register_step_pre_hook(lambda *_: grads.append(model.weight.grad.clone()))
    args = train.parse_args(['--data-dir', 'x', '--device', 'cpu', '--no-progress', '--grad-accum-steps', '2'])
    args.rank = 0
    result = train.train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, None, 0, 0, args)

    def mean_grad(indices):
        weight = model.weight.detach().requires_grad_()
        loss = sum(F.cross_entropy(F.linear(batches[i][0], weight, model.bias), batches[i][1]) for i in indices)
        return torch.autograd.grad(loss / len(indices), weight)[0]

    assert result['num_updates'] == 3
    assert len(grads) == 3
    for grad, group in zip(grads, [(0, 1), (2, 3), (4,)]):
        torch.testing.assert_close(grad, mean_grad(group))  # the last group is divided by 1, not by 2
    assert model.calls == [True, False, True, False, False]  # gradients all-reduced only at each group's end
    assert model.weight.grad is None  # cleared after the last update
    losses = [F.cross_entropy(model(x), y).item() for x, y in batches]
    assert result['loss'] == pytest.approx(sum(losses) / 5)


def test_grad_accum_resume_mid_epoch_matches_uninterrupted(digits_subset, tmp_path):
    # 9 batches per epoch in groups of 2: 5 updates, the last of one batch. The per-update warmup makes the restored
    # update count matter, drop path and the EMA the restored RNG and EMA states.
    flags = ['--grad-accum-steps', '2', '--checkpoint-interval', '2', '--sched-on-updates', '--warmup-epochs', '1',
             '--drop-path', '0.2', '--model-ema', '--model-ema-decay', '0.8']
    full = tmp_path / 'full'
    train.main(_train_args(digits_subset, full, 2, *flags))

    killed = tmp_path / 'killed'
    with pytest.raises(SystemExit, match='update 9'):
        train.main(_train_args(digits_subset, killed, 2, *flags, '--stop-after-updates', '9'))
    checkpoint = _load(killed / 'last.pth.tar')
    assert (checkpoint['epoch'], checkpoint['batch_idx']) == (1, 6)  # update 8 = epoch 1, 3 updates = 6 batches in
    resumed = train.main(_train_args(digits_subset, killed, 2, *flags, '--resume', str(killed / 'last.pth.tar')))
    assert (resumed['start_epoch'], resumed['start_batch']) == (1, 6)

    a, b = _load(full / 'last.pth.tar'), _load(killed / 'last.pth.tar')
    _assert_same_weights(a, b, keys=('state_dict', 'state_dict_ema'))
    assert {int(state['step']) for state in b['optimizer']['state'].values()} == {10}
    rows_a, rows_b = _summary(full), _summary(killed)
    assert len(rows_b) == 2
    for row_a, row_b in zip(rows_a, rows_b):
        for field in ('train_loss', 'eval_top1', 'ema_eval_top1', 'lr'):
            assert float(row_b[field]) == pytest.approx(float(row_a[field]), abs=1e-6)


@pytest.mark.parametrize('sched_on_updates', [False, True], ids=['per_epoch', 'per_update'])
def test_cooldown_epochs(digits_subset, tmp_path, sched_on_updates):
    output = tmp_path / 'run'
    flags = ['--cooldown-epochs', '1', '--min-lr', '1e-4'] + (['--sched-on-updates'] if sched_on_updates else [])
    result = train.main(_train_args(digits_subset, output, 1, *flags))
    rows = _summary(output)
    assert [int(r['epoch']) for r in rows] == [0, 1] and result['epochs_run'] == 2
    # the 1-epoch cosine is over after epoch 0: the cooldown epoch trains at min_lr
    assert float(rows[1]['lr']) == pytest.approx(1e-4, rel=1e-9)
    assert float(rows[0]['lr']) > 1e-3
    assert _load(output / 'last.pth.tar')['epoch'] == 1


def _log_softmax(x):
    return x - x.exp().sum(1, keepdim=True).log()


def test_distillation_loss_matches_deit():
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(3, 3, 5).double()  # student cls and dist, teacher: 3 images, 5 classes
    labels = torch.tensor([0, 3, 4])
    alpha, tau = 0.3, 2.0
    rows = torch.arange(3)

    def ce(logits, target):
        return -_log_softmax(logits)[rows, target].mean()

    def soft(student):  # KL(teacher || student) at temperature tau, summed, x tau^2 / numel
        log_p, log_q = _log_softmax(teacher / tau), _log_softmax(student / tau)
        return (log_p.exp() * (log_p - log_q)).sum() * tau ** 2 / student.numel()

    hard_loss = train.DistillationLoss(nn.CrossEntropyLoss(), 'hard', alpha, tau)
    soft_loss = train.DistillationLoss(nn.CrossEntropyLoss(), 'soft', alpha, tau)
    teacher_argmax = teacher.argmax(1)
    # one output tensor serves both terms
    assert hard_loss(cls, labels, teacher).item() == pytest.approx(
        ((1 - alpha) * ce(cls, labels) + alpha * ce(cls, teacher_argmax)).item(), rel=1e-12)
    assert soft_loss(cls, labels, teacher).item() == pytest.approx(
        ((1 - alpha) * ce(cls, labels) + alpha * soft(cls)).item(), rel=1e-12)
    # a (cls, dist) output: cls against the labels, dist against the teacher, as DeiT
    assert hard_loss((cls, dist), labels, teacher).item() == pytest.approx(
        ((1 - alpha) * ce(cls, labels) + alpha * ce(dist, teacher_argmax)).item(), rel=1e-12)
    assert soft_loss((cls, dist), labels, teacher).item() == pytest.approx(
        ((1 - alpha) * ce(cls, labels) + alpha * soft(dist)).item(), rel=1e-12)
    # mixup's soft targets go to the base loss
    mixed = 0.6 * F.one_hot(labels, 5).double() + 0.4 * F.one_hot(labels.flip(0), 5).double()
    mixed_loss = train.DistillationLoss(SoftTargetCrossEntropy(), 'soft', alpha, tau)
    assert mixed_loss(cls, mixed, teacher).item() == pytest.approx(
        ((1 - alpha) * -(mixed * _log_softmax(cls)).sum(1).mean() + alpha * soft(cls)).item(), rel=1e-12)
    with pytest.raises(ValueError):
        train.DistillationLoss(nn.CrossEntropyLoss(), 'none')


@pytest.mark.parametrize('distill_type', ['hard', 'soft'])
def test_distillation_run(digits_subset, tmp_path, monkeypatch, distill_type):
    # a random test_efficientnet teacher (BatchNorm: train mode would move its running statistics) for the
    # test_convnext student, normalized with another mean / std
    teacher_path = tmp_path / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('test_efficientnet', num_classes=10).state_dict(), teacher_path)
    teachers = []

    class RecordingTeacher(train.Teacher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = []
            self.model.register_forward_hook(lambda module, input, output: self.calls.append(
                (torch.is_grad_enabled(), any(m.training for m in module.modules()))))
            teachers.append(self)

    monkeypatch.setattr(train, 'Teacher', RecordingTeacher)
    output = tmp_path / 'run'
    extra = ['--mixup', '0.8', '--smoothing', '0.1'] if distill_type == 'soft' else []
    result = train.main(_train_args(
        digits_subset, output, 1, '--distill-teacher', 'test_efficientnet', '--teacher-checkpoint', str(teacher_path),
        '--distill-type', distill_type, '--distill-alpha', '0.5', '--distill-tau', '2', *extra))
    assert math.isfinite(result['final_eval_loss'])

    (teacher,) = teachers
    assert len(teacher.calls) == 9  # once per training batch, never in evaluation
    assert not any(grad_enabled or training for grad_enabled, training in teacher.calls)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    _assert_same_weights({'state_dict': _load(teacher_path)}, {'state_dict': teacher.model.state_dict()}, atol=0)
    assert set(_load(output / 'last.pth.tar')['state_dict']) == set(timm.create_model('test_convnext').state_dict())
    # the student's inputs, normalized with 0.5 / 0.5, reach the teacher normalized with its ImageNet mean / std
    image = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(teacher.model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    assert not torch.equal(mean, torch.full_like(mean, 0.5))
    torch.testing.assert_close(teacher((image - 0.5) / 0.5), teacher.model((image - mean) / std))
    # without a checkpoint the pretrained teacher must have the student's classes (no silently random head)
    with pytest.raises(ValueError, match='has 1000 classes, the student 10'):
        train.Teacher('regnety_160.deit_in1k', 10, (0.5,) * 3, (0.5,) * 3)


def test_sync_bn_under_gloo(digits_subset, tmp_path):
    # torch's SyncBatchNorm trains on cuda / hpu / xpu only: on CPU the converted model stops with a clear message
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(REPO_ROOT / 'tools' / 'train.py'), *_train_args(digits_subset, tmp_path / 'run', 1, '--model',
                                                              'test_resnet', '--sync-bn')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    match = re.search(r'--sync-bn: (\d+) BatchNorm layers of test_resnet were converted to SyncBatchNorm, which '
                      r'torch runs on cuda/hpu/xpu/\w+ only, not on cpu', proc.stderr)
    assert match, proc.stderr[-3000:]
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in timm.create_model('test_resnet').modules())
    assert int(match.group(1)) == num_bn > 0


def test_recipe_configs():
    configs = REPO_ROOT / 'configs' / 'imagenet'

    def parse(name):
        return train.parse_args(['-c', str(configs / f'{name}.yaml'), '--data-dir', 'x'])

    # L2ViT: total batch 4096 = 128 per GPU x 8 GPUs x update_freq 4; the 384 fine-tune 1024 = 64 x 8 x 2
    for name in ('l2vit_tiny', 'l2vit_small', 'l2vit_base'):
        args = parse(name)
        assert args.batch_size * 8 * args.grad_accum_steps == 4096 and args.grad_accum_steps == 4
    args = parse('l2vit_base_384')
    assert args.batch_size * 8 * args.grad_accum_steps == 1024 and args.grad_accum_steps == 2
    # VCMamba: DeiT soft distillation from DeiT's RegNetY-16GF
    for name in ('vcmamba_small', 'vcmamba_medium', 'vcmamba_base'):
        args = parse(name)
        assert (args.distill_teacher, args.distill_type, args.distill_alpha, args.distill_tau) == (
            'regnety_160.deit_in1k', 'soft', 0.5, 1.0)
        assert args.cooldown_epochs == 0
    assert timm.list_pretrained('regnety_160.deit_in1k') == ['regnety_160.deit_in1k']
    # InLine PVT / CSwin and NAT / DiNAT (mini to base): 10 cooldown epochs after the schedule
    for name in ('inline_pvt_tiny', 'inline_pvt_small', 'inline_pvt_medium', 'inline_pvt_large',
                 'inline_cswin_tiny', 'inline_cswin_small', 'inline_cswin_base', 'inline_cswin_base_384',
                 'nat_mini', 'nat_tiny', 'nat_small', 'nat_base', 'dinat_mini', 'dinat_tiny', 'dinat_small',
                 'dinat_base'):
        assert parse(name).cooldown_epochs == 10, name
