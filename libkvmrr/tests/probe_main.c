#include <stdio.h>
#include "kvmrr.h"
int main(void){ char why[256]; int c = kvmrr_calibrate(why, sizeof why); printf("calibrate=%d %s\n", c, why); return 0; }
