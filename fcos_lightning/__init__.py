"""fcos_lightning: AdelaiDet's FCOS detector trained with PyTorch Lightning and configured with Hydra.

Conventions, stated once for the whole package:

- boxes are ``xyxy`` in absolute pixels of the image they belong to (resized image inside the model,
  original image in results);
- labels are contiguous ``0..C-1`` foreground classes; there is no background logit (sigmoid classifier);
  ``C`` (``num_classes``) counts foreground classes only;
- shape comments use ``B`` images, ``R`` points (all levels concatenated, level-major, row-major inside a
  level), ``M`` ground-truth boxes, ``L`` FPN levels, ``C`` classes;
- images travel as ``uint8`` RGB tensors ``[B, 3, H, W]``; the model normalizes them on its device;
- a model's *geometry* is where its points sit and which object sizes each level takes: ``strides``,
  ``sizes_of_interest`` and ``point_offset``;
- the run's configuration is ``cfg`` (a composed Hydra ``DictConfig``, seen only in ``fcos_lightning.app``);
  a checkpoint describes its network with plain values instead (:mod:`fcos_lightning.checkpoint`);
- norms are spelled ``FrozenBN``, ``BN``, ``SyncBN``, ``GN``, ``none`` (detectron2's names).
"""

__version__ = "0.1.0"
