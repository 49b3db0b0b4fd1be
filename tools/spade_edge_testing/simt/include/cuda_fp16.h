// Stand-in for CUDA's cuda_fp16.h under the SIMT emulator: the half types come from simt.h.
#pragma once
#include "simt.h"
