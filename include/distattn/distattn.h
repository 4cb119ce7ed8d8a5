#pragma once
// Umbrella header.
#include "distattn/config.h"
#include "distattn/core/device.h"
#include "distattn/core/dtype.h"
#include "distattn/core/error.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"
#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/ops/attention.h"
#include "distattn/runtime.h"
