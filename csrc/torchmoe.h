// The torchmoe C++ API. Link against libtorchmoe (or torchmoe/_C.so) and libtorch.
#pragma once

#include "ops/combine.h"
#include "ops/dispatch.h"
#include "ops/grouped_mm.h"
#include "ops/grouped_mm_quantized.h"
#include "ops/moe_forward.h"
#include "ops/route_plan.h"
#include "ops/router_logits.h"
#include "ops/swiglu.h"
#include "ops/topk_gating.h"
