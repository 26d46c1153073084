// Umbrella header: every host-side part of gcomp (CUDA, MPI and NCCL parts have their own headers).
#pragma once

#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/exec/policy.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/comm/stats.hpp"
#include "gcomp/aggregate/allreduce.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"
