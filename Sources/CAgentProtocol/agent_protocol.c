// The protocol is its header (include/agent_protocol.h); a C target needs one source file.
#include "agent_protocol.h"
