# Installs gcomp into a scratch prefix, then builds and runs tests/install/consumer
# twice: once through find_package(gcomp CONFIG), once through add_subdirectory.
foreach(var SOURCE_DIR WORK_DIR GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check.cmake needs -D${var}=...")
  endif()
endforeach()

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

# A minimal configure of gcomp itself, as a package maintainer would do it.
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/gcomp -G ${GENERATOR}
    -DCMAKE_INSTALL_PREFIX=${prefix} -DGCOMP_BUILD_TESTS=OFF -DGCOMP_BUILD_BENCH=OFF
    -DGCOMP_BUILD_EXAMPLES=OFF -DGCOMP_WITH_CUDA=OFF -DGCOMP_WITH_MPI=OFF -DGCOMP_WITH_NCCL=OFF
    -DGCOMP_WITH_TORCH=OFF -DGCOMP_WITH_OPENMP=OFF)
run(${CMAKE_COMMAND} --install ${WORK_DIR}/gcomp)
if(NOT EXISTS ${prefix}/include/gcomp/gcomp.hpp)
  message(FATAL_ERROR "install did not place include/gcomp/gcomp.hpp under ${prefix}")
endif()

foreach(mode package subdirectory)
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/consumer -B ${WORK_DIR}/consumer_${mode}
      -G ${GENERATOR} -DCMAKE_PREFIX_PATH=${prefix} -DCONSUMER_MODE=${mode}
      -DGCOMP_SOURCE_DIR=${SOURCE_DIR})
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer_${mode})
  run(${WORK_DIR}/consumer_${mode}/consumer)
endforeach()
