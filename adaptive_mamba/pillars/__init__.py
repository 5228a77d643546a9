"""The three self-adapting pillars, each split into collect statistics / decide / apply (see README.md, "The three pillars").

1. scan order (scan_order.py): ScanStatsCollector -> decide_scan_order -> reparametrization_plan / apply_scan_order
2. learned masks (masks.py): MaskConfig, apply_masks, mask_regularizer, temperature_at / set_temperature,
   sparsity_report, compile_masks
3. hybrid PEFT (hybrid_peft.py): HybridPeftConfig, module_importance -> decide_allocation -> apply_allocation,
   format_allocation_table, trainable_report
Persistence of all three (persistence.py): save_adaptive_model / load_adaptive_model.
"""
from adaptive_mamba.pillars.hybrid_peft import (AllocationDecision, HybridPeftConfig, allocation_counts,
                                                apply_allocation, current_allocation, decide_allocation,
                                                format_allocation_table, module_importance, pruned_modules,
                                                set_trainable, trainable_report, uniform_allocation)
from adaptive_mamba.pillars.masks import (CompactLinear, MaskConfig, MaskedLinear, apply_masks, compile_masks,
                                          expected_sparsity, format_sparsity_report, mask_regularizer,
                                          masked_modules, set_temperature, sparsity_report, temperature_at)
from adaptive_mamba.pillars.persistence import base_state_dict, load_adaptive_model, save_adaptive_model
from adaptive_mamba.pillars.scan_order import (PermuteOp, ScanOrderDecision, ScanStatsCollector, apply_scan_order,
                                               current_scan_order, decide_scan_order, reorder_block_sizes,
                                               reparametrization_plan)

__all__ = ["AllocationDecision", "CompactLinear", "HybridPeftConfig", "MaskConfig", "MaskedLinear", "PermuteOp",
           "ScanOrderDecision", "ScanStatsCollector", "allocation_counts", "apply_allocation", "apply_masks",
           "apply_scan_order", "base_state_dict", "compile_masks", "current_allocation", "current_scan_order",
           "decide_allocation", "decide_scan_order", "expected_sparsity", "format_allocation_table",
           "format_sparsity_report", "load_adaptive_model", "mask_regularizer", "masked_modules",
           "module_importance", "pruned_modules", "reorder_block_sizes", "reparametrization_plan", "save_adaptive_model",
           "set_temperature", "set_trainable", "sparsity_report", "temperature_at", "trainable_report",
           "uniform_allocation"]
