# cmake -DPTX=<file.ptx>[;<file.ptx>...] -P check_unfused_ptx.cmake
#
# Fails unless the PTX has no floating-point operation that nvcc's default
# --fmad=true may contract into a fused multiply-add in a way that changes
# results: no fma/mad at all (what the front end emits for a contracted
# a * b + c), and every multiply the back end (ptxas) could still fuse, an
# unqualified mul.f32/mul.f64, must be by a power of two, whose product is
# exact, so fusing it changes nothing. Multiplies spelled
# gcomp::detail::mul_unfused are mul.rn, which ptxas never fuses. This is the
# CI check of the rule in docs/notes.md ("FMA on the device") for the CUDA
# tests built with FMAD: it needs nvcc, not a GPU.
if(NOT PTX)
  message(FATAL_ERROR "check_unfused_ptx: pass -DPTX=<file.ptx>")
endif()
set(problems 0)
foreach(file IN LISTS PTX)
  if(NOT EXISTS "${file}")
    message(FATAL_ERROR "check_unfused_ptx: ${file} does not exist")
  endif()
  file(STRINGS "${file}" lines REGEX "^[ \t]+(fma|mad|mul)(\\.[a-z0-9]+)*\\.f(16|32|64)[ \t]")
  set(muls 0)
  foreach(line IN LISTS lines)
    string(STRIP "${line}" op)
    if(op MATCHES "^(fma|mad)\\.")
      message(SEND_ERROR "${file}: a fused multiply-add: ${op}")
      math(EXPR problems "${problems} + 1")
    elseif(op MATCHES "^mul\\.f(32|64)[ \t]")
      # Unqualified: fusable. Allowed only with a power-of-two (or zero)
      # immediate, whose product is exact: float bits 0fXXXXXXXX with the 23
      # mantissa bits zero (the third hex digit 0 or 8, then five zeros), or
      # double bits 0dXXXXXXXXXXXXXXXX with the 52 mantissa bits zero.
      math(EXPR muls "${muls} + 1")
      if(NOT op MATCHES "[ \t,]0[fF][0-9A-Fa-f][0-9A-Fa-f][08]00000([;, \t]|$)" AND
         NOT op MATCHES "[ \t,]0[dD][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]0000000000000([;, \t]|$)")
        message(SEND_ERROR "${file}: a multiply nvcc may fuse (spell it mul_unfused): ${op}")
        math(EXPR problems "${problems} + 1")
      endif()
    endif()
  endforeach()
  list(LENGTH lines ops)
  message(STATUS "${file}: ${ops} multiplies and fused ops examined, ${muls} unqualified multiplies")
endforeach()
if(problems GREATER 0)
  message(FATAL_ERROR "check_unfused_ptx: ${problems} contractible operation(s); see docs/notes.md, FMA on the device")
endif()
